-- viewers: how many sessions are in a room, counted over live nodes only.
--
-- KEYS[1]  the room's presence hash (field: node id, value: sessions there)
-- ARGV[1]  prefix of node heartbeat keys (prefix .. node id)
--
-- Returns the total as an integer.
--
-- Invariant: counts of nodes whose heartbeat expired (a crashed process) are
-- not counted, and are removed so the hash does not grow with dead nodes.
-- Reads only, before its one kind of write (HDEL of dead fields).
-- On Redis Cluster the heartbeat keys live in other slots: this script is
-- for a single primary; a cluster deployment keeps presence per shard.
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[1] .. fields[i]) == 1 then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return total
