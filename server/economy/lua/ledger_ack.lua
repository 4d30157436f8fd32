-- ledger_ack: after the ledger writer's COMMIT, its entries leave the
-- outbox and the spends waiting on them (durability `ledger`, on any node)
-- are told, in one atomic call (a MULTI would do on a single Redis, but a
-- cluster client refuses PUBLISH inside one).
--
-- KEYS[1]  the ledger outbox stream ({eco})
-- ARGV[1]  the outbox's consumer group
-- ARGV[2]  the ledger commits channel (classic pub/sub: every node hears it)
-- ARGV[3]  the `C` payload of the committed transactions ('' for none)
-- ARGV[4]  the `R` payload of the parked ones ('' for none)
-- ARGV[5..] the outbox entry ids
--
-- Returns the number of entries deleted.
local ids = {}
for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
local deleted = redis.call('XDEL', KEYS[1], unpack(ids))
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[4]) end
return deleted
