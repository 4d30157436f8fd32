-- goal_state: write a room's tip goal into its Redis hash (Keys.goal), after
-- Postgres has (the state decides there; this copy is what tip.lua and
-- tip_item.lua read and count into).
--
-- KEYS[1]  the room's goal hash ({eco})
-- ARGV[1]  'set': a new goal replaces whatever the hash held; ARGV[2..] are
--          its field, value pairs (progress 0)
--          'close': the goal ARGV[2] leaves `active` for the state ARGV[3]
--          (reached, failed, deleted); a hash naming another goal is left
--          as it is
--
-- Returns 'OK' for 'set'; for 'close' {state before, progress} ('' and 0
-- when the hash names another goal), or 'NOT_LOADED' when the hash is
-- missing (the caller loads it from Postgres, which has the new state).
-- Invariant: once 'close' returns, no tip counts toward the goal or enters
-- its escrow: the hash says it is not active, in the slot tips run in.
if ARGV[1] == 'set' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  return 'OK'
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOT_LOADED' end
local found = redis.call('HMGET', KEYS[1], 'id', 'state', 'progress')
if found[1] ~= ARGV[2] then return {'', 0} end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
return {found[2], tonumber(found[3])}
