-- meter: charge one billing period of a private show (or its final part),
-- in one atomic call: first from the show's escrow (the minimum held at the
-- start), the rest from the fan, all to the model.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance   the fan's balance
-- KEY.escrow_balance  the show's escrow account's balance
-- KEY.payee_balance   the model's balance
-- ARG.amount          tokens, > 0: the period's price (the caller computes
--                     floor(rate * s / 60) differences, so the sum of the
--                     periods is exact to the second)
-- ARG.payer, ARG.escrow, ARG.payee  the three accounts
-- ARG.payer_channel, ARG.payee_channel  balance pushes to both
--
-- Returns {'OK', '{"balance":N,"escrow":E,"amount":A,"tx":T}'} (N: the
-- fan's balance, E: what the escrow still holds), INSUFFICIENT_FUNDS (the
-- fan's balance) when escrow and fan together hold less than the amount:
-- nothing moved, the key not burnt, so the caller ends the show at the
-- second the balance covers and charges that instead.
-- Invariant: the idempotency key names the show and the tick number, so a
-- period is charged once whichever node's meter (or a retry after a crash)
-- runs it; every check precedes the first write.
local amount = tonumber(ARG.amount)
local refusal = idem_prior()
  or first_unloaded(KEY.payer_balance, KEY.escrow_balance, KEY.payee_balance)
  or outbox_full()
if refusal then return refusal end
local escrow = balance_of(KEY.escrow_balance)
local from_escrow = math.min(math.max(escrow, 0), amount)
local from_fan = amount - from_escrow
refusal = user_gate(KEY.payer_balance, from_fan, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end

local entry = ''
local payee_balance
if from_escrow > 0 then
  local _, credited = transfer(KEY.escrow_balance, KEY.payee_balance, from_escrow)
  payee_balance = credited
  entry = ARG.escrow .. ' ' .. (-from_escrow) .. ' '
end
if from_fan > 0 then
  local _, credited = transfer(KEY.payer_balance, KEY.payee_balance, from_fan)
  payee_balance = credited
  entry = entry .. ARG.payer .. ' ' .. (-from_fan) .. ' '
end
entry = entry .. ARG.payee .. ' ' .. amount
local payer_balance = balance_of(KEY.payer_balance)
local reply = cjson.encode({balance = payer_balance, escrow = escrow - from_escrow,
                            amount = amount, tx = ARG.tx})
outbox_add('meter', entry, reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payee_channel, 'B' .. payee_balance)
if from_fan > 0 then redis.call('PUBLISH', ARG.payer_channel, 'B' .. payer_balance) end
return {'OK', reply}
