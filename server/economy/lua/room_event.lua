-- room_event: append one event to a room's history and publish it, atomically.
--
-- KEYS[1]  the room's history stream
-- KEYS[2]  the room's running-show marker (show_state.lua)
-- KEYS[3]  the room's pub/sub channel, published with SPUBLISH (sharded:
--          on a Redis Cluster only its slot's shard carries it), so it is
--          a key: the script runs where the channel's shard is
-- ARGV[1]  history length to keep (exact MAXLEN)
-- ARGV[2]  the event as a JSON object, without `offset` and `ts`
-- ARGV[3]  the posting user's account (`u:<id>`); '' for the server's
--          own events (`show`), which are never marked; '*' for the
--          server's events that come of show time (`king`: a fan's tips
--          during the show may crown them), marked without a ticket check
-- ARGV[4]  history age to keep, in ms (history_add, history_lib.lua)
--
-- Returns the event's offset (its stream id, "ms-seq"), or
-- {'NO_TICKET', show} when a ticket show runs in the room and the user is
-- neither its model nor a ticket holder (nothing written).
--
-- Invariant: an event is in history exactly when it was published, and Redis
-- runs scripts one at a time, so the order of the history stream is the order
-- in which every subscriber of the channel receives the room's events. That is
-- what makes one room one order across processes and machines. While a show
-- runs, every event carries `"in_show":"<id>"` as its last field, in history
-- and live alike, and the gateway gives it only to those who see the show.
--
-- The published payload is "E<offset> <json>" (kind E in server/bus.py);
-- subscribers add `offset` and `ts` (the id's millisecond part) to the JSON,
-- the same way history readers do.
local event = ARGV[2]
local show = redis.call('HGET', KEYS[2], 'id')
if show and ARGV[3] ~= '' then
  if ARGV[3] ~= '*' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
    return {'NO_TICKET', show}
  end
  event = string.sub(event, 1, -2) .. ',"in_show":"' .. show .. '"}'
end
local id = history_add(KEYS[1], event, ARGV[1], ARGV[4])
redis.call('SPUBLISH', KEYS[3], 'E' .. id .. ' ' .. event)
return id
