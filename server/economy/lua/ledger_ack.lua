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
-- Ids per XACK/XDEL: Lua's unpack gives at most about 8000 values (its C
-- stack), and a batch has TOKENCHAT_LEDGER_BATCH_MAX ids, unbounded above.
local CHUNK = 1000
local deleted = 0
for first = 5, #ARGV, CHUNK do
  local last = math.min(first + CHUNK - 1, #ARGV)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
  deleted = deleted + redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[4]) end
return deleted
