-- relay_deliver: one delivery entry's events into their room, once (the
-- delivery relay, server/economy/relay.py; docs/economy.md, "Delivery relay").
-- Runs in the room's slot: every key below carries the room's hash tag.
--
-- KEYS[1]  the room's dedupe key of the entry's transaction (Keys.relayed)
-- KEYS[2]  the room's history stream
-- KEYS[3]  the room's pub/sub channel: declared as a key so that the
--          script's slot is the channel's too (sharded pub/sub publishes
--          a channel from its own slot)
-- ARGV[1]  how long the dedupe key lives, in milliseconds
-- ARGV[2]  history length to keep (exact MAXLEN)
-- ARGV[3]  the events, JSON objects without `offset` and `ts`, separated by
--          newlines (money_lib's relay_flush), in the order of the spend
-- ARGV[4]  history age to keep, in ms (history_add, history_lib.lua)
--
-- Returns the first event's offset, or 'DUP' when this transaction's events
-- were delivered already (nothing written).
-- Invariant: the relay delivers at least once (an entry is acknowledged
-- only after this ran); the dedupe key, looked up before the first XADD
-- and set after the last, makes every run after the first a no-op while
-- the key lives, so history holds the events once and members receive
-- them once. Set last because Redis does not roll a script back: a write
-- that fails (the history key of another type) must leave the entry
-- undelivered, for the relay to try again, not marked delivered. As in
-- room_event.lua, history order is publish order. The events come marked (`in_show`) by the money script,
-- which read the show marker's {eco} mirror.
if redis.call('EXISTS', KEYS[1]) == 1 then return 'DUP' end
local first = nil
for event in string.gmatch(ARGV[3], '[^\n]+') do
  local offset = history_add(KEYS[2], event, ARGV[2], ARGV[4])
  redis.call('SPUBLISH', KEYS[3], 'E' .. offset .. ' ' .. event)
  first = first or offset
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return first or ''
