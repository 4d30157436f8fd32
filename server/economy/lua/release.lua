-- release: move the WHOLE balance of an escrow account to the user who
-- earned it (the model who delivered a request), in one atomic call.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.escrow_balance  the escrow account's balance
-- KEY.payee_balance   the earner's balance
-- ARG.escrow, ARG.payee  the escrow's and the earner's accounts
-- ARG.payee_channel   the earner's user channel (balance push)
--
-- Returns {'OK', '{"balance":N,"amount":A,"tx":T}'} (N: the earner's
-- balance, A: what was released), EMPTY when the escrow holds nothing, or a
-- refusal (money_lib).
-- Invariant: nothing leaves an escrow twice. The amount is not an argument:
-- it is whatever the escrow holds, so once a release or an escrow_refund
-- has emptied it, every later one (another key, a sweeper, a replay after
-- Redis lost its data and reloaded the escrow from Postgres) finds 0 and is
-- refused with nothing moved. EMPTY does not burn the key.
local refusal = idem_prior()
  or first_unloaded(KEY.escrow_balance, KEY.payee_balance)
  or outbox_full()
if refusal then return refusal end
local amount = balance_of(KEY.escrow_balance)
if amount <= 0 then return {'EMPTY'} end
-- The earner is credited, not charged: the gate sees a debit of 0.
refusal = user_gate(KEY.payee_balance, 0)
if refusal then return refusal end

local _, payee_balance = transfer(KEY.escrow_balance, KEY.payee_balance, amount)
local reply = cjson.encode({balance = payee_balance, amount = amount, tx = ARG.tx})
outbox_add('release', postings(ARG.escrow, ARG.payee, amount), reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payee_channel, 'B' .. payee_balance)
return {'OK', reply}
