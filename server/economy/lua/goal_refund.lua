-- goal_refund: give one fan's tips back from an all-or-nothing goal's escrow
-- (its deadline passed before its target, or the model deleted it), in one
-- atomic call. Ledger kind escrow_refund.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.escrow_balance  the goal's escrow account's balance
-- KEY.payer_balance   the fan's balance
-- ARG.amount          what the fan's tips put in, less what came back
--                     (server/economy/goals.py reads it from the ledger)
-- ARG.escrow, ARG.payer  the escrow's and the fan's accounts
-- ARG.payer_channel   the fan's user channel (balance push)
--
-- Returns {'OK', '{"balance":N,"amount":A,"tx":T}'}, EMPTY when the escrow
-- holds less than the amount (released, or refunded already), or a refusal
-- (money_lib).
-- Invariant: nothing leaves an escrow twice. One key per goal and fan
-- (`goal-refund:<goal>:<fan>`) makes a repeat a duplicate, its record
-- restored with the escrow's balance after a Redis loss (a debit of the
-- escrow); and the caller reads the amounts only once the ledger holds
-- exactly what the escrow holds, so an amount is never one paid back.
local amount = tonumber(ARG.amount)
local refusal = idem_prior()
  or first_unloaded(KEY.escrow_balance, KEY.payer_balance)
  or outbox_full()
if refusal then return refusal end
if amount <= 0 or balance_of(KEY.escrow_balance) < amount then return {'EMPTY'} end
-- Tokens come back to the fan: the gate sees a debit of 0.
refusal = user_gate(KEY.payer_balance, 0)
if refusal then return refusal end

local _, payer_balance = transfer(KEY.escrow_balance, KEY.payer_balance, amount)
local reply = cjson.encode({balance = payer_balance, amount = amount, tx = ARG.tx})
outbox_add('escrow_refund', postings(ARG.escrow, ARG.payer, amount), reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payer_channel, 'B' .. payer_balance)
return {'OK', reply}
