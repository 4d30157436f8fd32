-- node_beat: a gateway node's heartbeat, in the one sorted set of nodes
-- (Keys.nodes): member the node's id, score the time (ms, Redis's clock)
-- its heartbeat runs out. A set of one key rather than a key per node, so
-- that a room's viewer count (viewers.lua) learns which nodes live without
-- reading keys of other slots on a Redis Cluster.
--
-- KEYS[1]  the nodes' sorted set
-- ARGV[1]  the node's id
-- ARGV[2]  ms until its heartbeat runs out; 0: it leaves now (a clean stop)
-- ARGV[3]  ms a node is remembered after its heartbeat ran out: its
--          presence counts in rooms are removed by viewers.lua meanwhile
--
-- Returns Redis's time in ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[3])))
return now
