-- history_lib: the one way an event enters a room's history. The loader
-- prepends this file to every money script (before money_lib.lua) and to
-- room_event.lua, so every XADD to a room's history (a chat line, a tip, a
-- goal, a show, a king) trims the same way.
--
-- history_add(key, event, len, age_ms): XADD the event (field `e`) with an
-- auto id; the stream keeps at most `len` events (exact MAXLEN: the memory
-- bound, TOKENCHAT_HISTORY_LEN) and drops those older than `age_ms` before
-- the new one (TOKENCHAT_HISTORY_AGE_S). Returns the new id ("ms-seq").
--
-- The age trim is approximate (`~`): Redis then removes only whole stream
-- nodes (up to stream-node-max-entries, 100 events), in O(1), instead of
-- rewriting the oldest node on every XADD. That is safe for recovery: it
-- only ever keeps more than asked (events somewhat older than `age_ms`,
-- within one node), never drops an event younger than `age_ms`, and the
-- count bound still holds exactly. The threshold comes from the new id's
-- millisecond part, Redis's own clock for the stream, so no TIME call.
local function history_add(key, event, len, age_ms)
  local id = redis.call('XADD', key, 'MAXLEN', len, '*', 'e', event)
  local oldest_ms = tonumber(string.match(id, '^(%d+)')) - tonumber(age_ms)
  if oldest_ms > 0 then
    redis.call('XTRIM', key, 'MINID', '~', string.format('%d', oldest_ms))
  end
  return id
end
