-- tip: move `amount` from the fan to the room's owner AND deliver the tip
-- event to the room, in one atomic call.
--
-- KEYS[1] idempotency key        KEYS[2] ledger outbox
-- KEYS[3] fan's balance          KEYS[4] owner's balance
-- KEYS[5] the room's history stream
-- ARGV[1] request fingerprint    ARGV[2] transaction id   ARGV[3] outbox bound
-- ARGV[4] amount (tokens, > 0)   ARGV[5] fan's account    ARGV[6] owner's account
-- ARGV[7] initiator (user id)    ARGV[8] idempotency key as the client sent it
-- ARGV[9] room channel           ARGV[10] history length
-- ARGV[11] tip event JSON without offset/ts
-- ARGV[12] owner's user channel  ARGV[13] meta JSON for the ledger
-- ARGV[14] the room's tip_min (tokens)
--
-- Returns {'OK', '{"balance":N,"tx":T,"offset":O}'}, {'TIP_MIN', tip_min}
-- when the amount is under it, or a refusal (money_lib). tip_min is checked
-- after the idempotency key, so a tip retried after the model raised her
-- minimum is still answered with its original reply.
-- Invariant: tokens move only with the tip queued for delivery (history XADD
-- and PUBLISH) and its ledger entry in the outbox; every check precedes the
-- first write; the fan's balance never goes below zero.
local amount = tonumber(ARGV[4])
local refusal = idem_prior()
if not refusal and amount < tonumber(ARGV[14]) then refusal = {'TIP_MIN', ARGV[14]} end
refusal = refusal or funds_refusal(3, 4, KEYS[3], amount)
if refusal then return refusal end

local fan_balance, owner_balance = transfer(KEYS[3], KEYS[4], amount)
local offset = redis.call('XADD', KEYS[5], 'MAXLEN', ARGV[10], '*', 'e', ARGV[11])
redis.call('PUBLISH', ARGV[9], 'E' .. offset .. ' ' .. ARGV[11])
local reply = cjson.encode({balance = fan_balance, tx = ARGV[2], offset = offset})
outbox_add('tip', ARGV[7], ARGV[8], postings(ARGV[5], ARGV[6], amount), reply, ARGV[13])
idem_record(reply)
redis.call('PUBLISH', ARGV[12], 'B' .. owner_balance)
return {'OK', reply}
