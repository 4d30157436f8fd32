-- refund: reverse a spend (tip, dm or spend) with a new transaction that
-- moves the same amount back from the payee to the payer.
--
-- KEYS[1] idempotency key        KEYS[2] ledger outbox
-- KEYS[3] payer's balance        KEYS[4] payee's balance
-- KEYS[5] the "refunded" marker of the original transaction
-- ARGV[1] request fingerprint    ARGV[2] transaction id   ARGV[3] outbox bound
-- ARGV[4] amount (tokens, > 0)   ARGV[5] payer's account  ARGV[6] payee's account
-- ARGV[7] initiator (admin)      ARGV[8] idempotency key as given
-- ARGV[9] the original transaction id
-- ARGV[10] payer's user channel  ARGV[11] payee's user channel
-- ARGV[12] marker lifetime (s)   ARGV[13] meta JSON for the ledger
--
-- Returns {'OK', '{"balance":N,"tx":T,"refunds":O}'} (N: the payer's balance)
-- or a refusal (money_lib); REFUNDED when the original was refunded already.
-- Invariant: one refund per spend (the marker here, and a unique column in
-- Postgres); the payee never goes below zero (INSUFFICIENT_FUNDS instead).
local prior = idem_prior()
if prior then return prior end
if redis.call('EXISTS', KEYS[5]) == 1 then return {'REFUNDED'} end
local amount = tonumber(ARGV[4])
-- The payee of the original pays the refund back.
local refusal = funds_refusal(3, 4, KEYS[4], amount)
if refusal then return refusal end

local payee_balance, payer_balance = transfer(KEYS[4], KEYS[3], amount)
local reply = cjson.encode({balance = payer_balance, tx = ARGV[2], refunds = ARGV[9]})
outbox_add('refund', ARGV[7], ARGV[8], postings(ARGV[6], ARGV[5], amount), reply, ARGV[13])
idem_record(reply)
redis.call('SET', KEYS[5], ARGV[2], 'EX', tonumber(ARGV[12]))
redis.call('PUBLISH', ARGV[10], 'B' .. payer_balance)
redis.call('PUBLISH', ARGV[11], 'B' .. payee_balance)
return {'OK', reply}
