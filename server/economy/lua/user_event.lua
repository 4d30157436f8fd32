-- user_event: queue one event for a user and publish it, atomically, the way
-- dm.lua delivers a DM: into the user's inbox stream (delivered at their
-- next hello if no session is open) and on their channel as a `D` payload
-- (server/bus.py), so it is delivered once, in inbox order, with their DMs.
--
-- KEYS[1]  the user's inbox stream
-- ARGV[1]  the user's channel
-- ARGV[2]  inbox entries kept (approximate MAXLEN, as dm.lua)
-- ARGV[3]  the complete event as a JSON object
--
-- Returns the event's inbox id.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[3])
redis.call('PUBLISH', ARGV[1], 'D' .. id .. ' ' .. ARGV[3])
return id
