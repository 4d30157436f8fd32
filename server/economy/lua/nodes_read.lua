-- nodes_read: the gateway nodes whose heartbeat runs (node_beat.lua) and
-- those whose heartbeat ran out, as of Redis's clock (the nodes' own clocks
-- may differ), for viewers.lua.
--
-- KEYS[1]  the nodes' sorted set (id -> when its heartbeat runs out, ms)
--
-- Returns {live ids, dead ids}. Reads only.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {
  redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf'),
  redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now),
}
