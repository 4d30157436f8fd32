-- credit: issue tokens from the mint to a user (purchases, grants).
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance  the mint's balance   KEY.payee_balance  the user's
-- ARG.amount         tokens, > 0
-- ARG.payer, ARG.payee  the mint's and the user's accounts
-- ARG.kind           'credit' or 'purchase'
-- ARG.payee_channel  the user's channel
-- KEY.payee_limits   the user's limits hash: a purchase is refused
--                    SELF_EXCLUDED while her self-exclusion runs (a grant
--                    is not: it costs her nothing)
--
-- Returns {'OK', '{"balance":N,"tx":T}'} or a refusal (money_lib).
-- Invariant: every token in circulation came from the mint, whose balance is
-- minus the total issued; so all balances together always sum to zero.
-- The mint is the one account allowed below zero: it has no funds check; the
-- user credited passes the user gate with nothing to pay.
local refusal = idem_prior()
  or first_unloaded(KEY.payer_balance, KEY.payee_balance)
  or outbox_full()
  or (ARG.kind == 'purchase' and excluded(KEY.payee_limits))
  or user_gate(KEY.payee_balance, 0)
if refusal then return refusal end
local amount = tonumber(ARG.amount)

local _, user_balance = transfer(KEY.payer_balance, KEY.payee_balance, amount)
local reply = cjson.encode({balance = user_balance, tx = ARG.tx})
outbox_add(ARG.kind, postings(ARG.payer, ARG.payee, amount), reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payee_channel, 'B' .. user_balance)
return {'OK', reply}
