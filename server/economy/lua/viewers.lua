-- viewers: how many sessions are in a room, counted over live nodes only.
--
-- KEYS[1]  the room's presence hash (field: node id, value: sessions there)
-- ARGV[1]  how many of the node ids that follow are live
-- ARGV[2..] the live nodes' ids, then the dead ones' (nodes_read.lua reads
--          both from the nodes' sorted set, a key of another slot: on a
--          Redis Cluster a script reads the keys of one slot only)
--
-- Returns the total as an integer.
--
-- Invariant: counts of nodes whose heartbeat ran out (a crashed process) are
-- not counted, and are removed so the hash does not grow with dead nodes. A
-- node named in neither list is not counted and is left alone: it is one
-- that beat for the first time after the lists were read (node_beat.lua
-- remembers dead ones for a day, so it is not one that died). Reads only,
-- before its one kind of write (HDEL of dead fields).
local live, dead = {}, {}
local live_count = tonumber(ARGV[1])
for i = 2, #ARGV do
  if i - 1 <= live_count then live[ARGV[i]] = true else dead[ARGV[i]] = true end
end
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if live[fields[i]] then
    total = total + tonumber(fields[i + 1])
  elseif dead[fields[i]] then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return total
