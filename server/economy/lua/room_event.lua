-- room_event: append one event to a room's history and publish it, atomically.
--
-- KEYS[1]  the room's history stream
-- ARGV[1]  the room's pub/sub channel
-- ARGV[2]  history length to keep (exact MAXLEN; the stream is tiny)
-- ARGV[3]  the event as a JSON object, without `offset` and `ts`
--
-- Returns the event's offset (its stream id, "ms-seq").
--
-- Invariant: an event is in history exactly when it was published, and Redis
-- runs scripts one at a time, so the order of the history stream is the order
-- in which every subscriber of the channel receives the room's events. That is
-- what makes one room one order across processes and machines.
--
-- The published payload is "E<offset> <json>" (kind E in server/bus.py);
-- subscribers add `offset` and `ts` (the id's millisecond part) to the JSON,
-- the same way history readers do.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'e', ARGV[3])
redis.call('PUBLISH', ARGV[1], 'E' .. id .. ' ' .. ARGV[3])
return id
