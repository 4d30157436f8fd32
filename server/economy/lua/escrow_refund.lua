-- escrow_refund: move the WHOLE balance of an escrow account back to the
-- user it came from (the fan whose offer was declined, cancelled or
-- expired), in one atomic call.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.escrow_balance  the escrow account's balance
-- KEY.payer_balance   the balance of the user who paid into it
-- ARG.escrow, ARG.payer  the escrow's and that user's accounts
-- ARG.payer_channel   that user's channel (balance push)
--
-- Returns {'OK', '{"balance":N,"amount":A,"tx":T}'} (N: the user's balance,
-- A: what was refunded), EMPTY when the escrow holds nothing, or a refusal
-- (money_lib).
-- Invariant: nothing leaves an escrow twice (see release.lua: the whole
-- balance moves, so a second release or refund finds 0 and moves nothing).
-- The caller names the user the escrow's holds came from (one per escrow of
-- a request; the hold transactions in the ledger say who).
local refusal = idem_prior()
  or first_unloaded(KEY.escrow_balance, KEY.payer_balance)
  or outbox_full()
if refusal then return refusal end
local amount = balance_of(KEY.escrow_balance)
if amount <= 0 then return {'EMPTY'} end
-- Tokens come back to the user: the gate sees a debit of 0.
refusal = user_gate(KEY.payer_balance, 0)
if refusal then return refusal end

local _, payer_balance = transfer(KEY.escrow_balance, KEY.payer_balance, amount)
local reply = cjson.encode({balance = payer_balance, amount = amount, tx = ARG.tx})
outbox_add('escrow_refund', postings(ARG.escrow, ARG.payer, amount), reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payer_channel, 'B' .. payer_balance)
return {'OK', reply}
