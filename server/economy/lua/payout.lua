-- payout: move the WHOLE balance of a payout request's escrow account to
-- `sys:payouts` (an admin approved it: the tokens leave the platform as
-- money), in one atomic call.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.escrow_balance   the payout's escrow account's balance
-- KEY.payouts_balance  the balance of `sys:payouts`
-- ARG.escrow, ARG.payouts  the escrow's and `sys:payouts`' accounts
--
-- Returns {'OK', '{"amount":A,"tx":T}'} (A: what was paid out), EMPTY when
-- the escrow holds nothing, or a refusal (money_lib).
-- Invariant: nothing leaves an escrow twice (see release.lua: the whole
-- balance moves, so a second payout or a refund finds 0 and moves nothing).
-- The tokens leaving are the model's, held in her payout's escrow: the gate
-- sees them debited from there (the whole balance, so funds always pass; a
-- per-user check every kind obeys would apply here too).
local refusal = idem_prior()
  or first_unloaded(KEY.escrow_balance, KEY.payouts_balance)
  or outbox_full()
if refusal then return refusal end
local amount = balance_of(KEY.escrow_balance)
if amount <= 0 then return {'EMPTY'} end
refusal = user_gate(KEY.escrow_balance, amount)
if refusal then return refusal end

transfer(KEY.escrow_balance, KEY.payouts_balance, amount)
local reply = cjson.encode({amount = amount, tx = ARG.tx})
outbox_add('payout', postings(ARG.escrow, ARG.payouts, amount), reply)
idem_record(reply)
return {'OK', reply}
