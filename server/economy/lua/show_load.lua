-- show_load: put a ticket show's hash (ticket.lua) into Redis from Postgres
-- (its row, and its tickets less their refunds from the ledger), unless
-- Redis lost its data (or someone else loaded it) since the caller read
-- Postgres: the fence of load_balance.lua.
--
-- KEYS[1] the epoch key   KEYS[2] the show's hash
-- ARGV[1] the epoch the caller saw before reading Postgres
-- ARGV[2..] field, value, field, value, ...
--
-- Returns 'OK', 'EXISTS' or 'EPOCH' (read Postgres again).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'EPOCH' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'EXISTS' end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 'OK'
