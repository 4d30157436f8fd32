-- spend: the generic paid action (room tickets, locked media, per-minute
-- shows): move `amount` from payer to payee and, in the same call, publish
-- what was paid for to a channel.
--
-- KEYS[1] idempotency key        KEYS[2] ledger outbox
-- KEYS[3] payer's balance        KEYS[4] payee's balance
-- ARGV[1] request fingerprint    ARGV[2] transaction id   ARGV[3] outbox bound
-- ARGV[4] amount (tokens, > 0)   ARGV[5] payer's account  ARGV[6] payee's account
-- ARGV[7] initiator              ARGV[8] idempotency key as given
-- ARGV[9] channel for the delivery ('' for none)  ARGV[10] delivery payload
-- ARGV[11] payee's user channel  ARGV[12] meta JSON for the ledger
--
-- Returns {'OK', '{"balance":N,"tx":T}'} or a refusal (money_lib).
-- Invariant: the delivery is published exactly when the payment moved and
-- its ledger entry is in the outbox; the payer never goes below zero.
local amount = tonumber(ARGV[4])
local refusal = idem_prior() or funds_refusal(3, 4, KEYS[3], amount)
if refusal then return refusal end

local payer_balance, payee_balance = transfer(KEYS[3], KEYS[4], amount)
local reply = cjson.encode({balance = payer_balance, tx = ARGV[2]})
outbox_add('spend', ARGV[7], ARGV[8], postings(ARGV[5], ARGV[6], amount), reply, ARGV[12])
idem_record(reply)
if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
redis.call('PUBLISH', ARGV[11], 'B' .. payee_balance)
return {'OK', reply}
