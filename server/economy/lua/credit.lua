-- credit: issue tokens from the mint to a user (purchases, grants).
--
-- KEYS[1] idempotency key        KEYS[2] ledger outbox
-- KEYS[3] the mint's balance     KEYS[4] the user's balance
-- ARGV[1] request fingerprint    ARGV[2] transaction id   ARGV[3] outbox bound
-- ARGV[4] amount (tokens, > 0)   ARGV[5] mint account     ARGV[6] user's account
-- ARGV[7] initiator              ARGV[8] idempotency key as given
-- ARGV[9] kind ('credit' or 'purchase')  ARGV[10] user's channel
-- ARGV[11] meta JSON for the ledger
--
-- Returns {'OK', '{"balance":N,"tx":T}'} or a refusal (money_lib).
-- Invariant: every token in circulation came from the mint, whose balance is
-- minus the total issued; so all balances together always sum to zero.
-- The mint is the one account allowed below zero: no funds check.
local refusal = idem_prior() or first_unloaded(3, 4) or outbox_full()
if refusal then return refusal end
local amount = tonumber(ARGV[4])

local _, user_balance = transfer(KEYS[3], KEYS[4], amount)
local reply = cjson.encode({balance = user_balance, tx = ARGV[2]})
outbox_add(ARGV[9], ARGV[7], ARGV[8], postings(ARGV[5], ARGV[6], amount), reply, ARGV[11])
idem_record(reply)
redis.call('PUBLISH', ARGV[10], 'B' .. user_balance)
return {'OK', reply}
