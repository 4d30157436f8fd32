-- show_state: set a ticket show's state in Redis, after Postgres has (the
-- state decides there; this copy is what ticket.lua reads), and return who
-- holds a ticket, for the room's running-show marker (show_marker.lua: a
-- key of the room's slot, which on a Redis Cluster this script cannot
-- write; shows.py calls the two in turn).
--
-- KEYS[1]  the show's hash ({eco}, ticket.lua)
-- ARGV[1]  the state: scheduled, running, ended or cancelled
--
-- Returns {'OK', field, field, ...}: `u:<user>` of each ticket holder
-- (refunded ones, 'r', left out) when the state is running, none else; or
-- 'NOT_LOADED' when the show's hash is missing (the caller loads it from
-- Postgres and the ledger, and calls again). Running twice is harmless.
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOT_LOADED' end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local out = {'OK'}
if ARGV[1] == 'running' then
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if string.sub(name, 1, 2) == 'u:' and value ~= 'r' then out[#out + 1] = name end
  end
end
return out
