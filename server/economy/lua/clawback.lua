-- clawback: take back up to ARG.amount tokens from a user, never more than
-- the user holds, into a system account: a purchase refunded or charged back
-- (kind 'chargeback', into sys:mint, which minted them) or a deleted
-- account's balance (kind 'forfeit', into sys:forfeited).
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.user_balance  the user's balance   KEY.sink_balance  the system account's
-- ARG.amount        tokens to take back at most, > 0
-- ARG.user, ARG.sink   the user's and the system account's ledger accounts
-- ARG.kind          'chargeback' or 'forfeit'
-- ARG.user_channel  the user's channel (balance push)
--
-- Returns {'OK', '{"balance":N,"tx":T,"clawed":C,"shortfall":S}'} or a
-- refusal (money_lib). C = min(balance, amount), S = amount - C: what the
-- user spent already is never taken (no balance goes below zero); the caller
-- records S durably. C = 0 writes no ledger entry (a transaction moves
-- something), only the idempotency record.
local refusal = idem_prior()
  or first_unloaded(KEY.user_balance, KEY.sink_balance)
  or outbox_full()
  or user_gate(KEY.user_balance, 0)
if refusal then return refusal end
local amount = tonumber(ARG.amount)
local balance = balance_of(KEY.user_balance)
local clawed = math.min(balance, amount)

if clawed > 0 then
  balance = transfer(KEY.user_balance, KEY.sink_balance, clawed)
end
local reply = cjson.encode({balance = balance, tx = ARG.tx, clawed = clawed,
  shortfall = amount - clawed})
if clawed > 0 then
  outbox_add(ARG.kind, postings(ARG.user, ARG.sink, clawed), reply)
  redis.call('PUBLISH', ARG.user_channel, 'B' .. balance)
end
idem_record(reply)
return {'OK', reply}
