-- ticket_refund: give one fan's ticket back from a show's escrow (the show
-- was cancelled, not started in time, or ended before its minimum length),
-- in one atomic call. Ledger kind escrow_refund.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.show            the show's hash (ticket.lua): `u:<fan>` = tokens paid
-- KEY.escrow_balance  the show's escrow account's balance
-- KEY.payer_balance   the fan's balance
-- ARG.escrow, ARG.payer  the escrow's and the fan's accounts
-- ARG.payer_channel   the fan's user channel (balance push)
--
-- Returns {'OK', '{"balance":N,"amount":A,"tx":T}'}, EMPTY when the fan has
-- no ticket left to refund (refunded already, or never bought) or the
-- escrow no longer holds it (released), or a refusal (money_lib).
-- Invariant: nothing leaves an escrow twice. The ticket's field turns to
-- 'r' in the same call that moves its tokens, and after a Redis loss the
-- show's hash is rebuilt from the ledger (tickets less their refunds), so a
-- second refund of one ticket finds 'r' whatever key it comes with; the
-- amount is what the ticket paid, never more than the escrow holds.
local refusal = idem_prior()
  or first_unloaded(KEY.show, KEY.escrow_balance, KEY.payer_balance)
  or outbox_full()
if refusal then return refusal end
local paid = redis.call('HGET', KEY.show, ARG.payer)
if not paid or paid == 'r' then return {'EMPTY'} end
local amount = tonumber(paid)
if balance_of(KEY.escrow_balance) < amount then return {'EMPTY'} end
-- Tokens come back to the fan: the gate sees a debit of 0.
refusal = user_gate(KEY.payer_balance, 0)
if refusal then return refusal end

local _, payer_balance = transfer(KEY.escrow_balance, KEY.payer_balance, amount)
redis.call('HSET', KEY.show, ARG.payer, 'r')
local reply = cjson.encode({balance = payer_balance, amount = amount, tx = ARG.tx})
outbox_add('escrow_refund', postings(ARG.escrow, ARG.payer, amount), reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payer_channel, 'B' .. payer_balance)
return {'OK', reply}
