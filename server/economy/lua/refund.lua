-- refund: reverse a refundable spend (a tip or a paid dm) with a new
-- transaction that moves the same amount back from the payee to the payer.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua); the
-- initiator is the admin.
-- KEY.payer_balance  the original payer's balance (gets the tokens back)
-- KEY.payee_balance  the original payee's balance (pays them back)
-- KEY.marker         the "refunded" marker of the original transaction
-- ARG.amount         tokens, > 0
-- ARG.payer, ARG.payee  the original payer's and payee's accounts
-- ARG.refunds        the original transaction id
-- ARG.payer_channel, ARG.payee_channel  their user channels
-- ARG.marker_ttl_s   the marker's lifetime
-- KEY.revoke, ARG.revoke_media  a refunded unlock: the fan's entitlements
--                    hash and the media id, whose access the refund revokes
--                    (it must be loaded, or a later load from a ledger
--                    without this refund yet would grant it back); '' else.
--
-- Returns {'OK', '{"balance":N,"tx":T,"refunds":O}'} (N: the payer's balance)
-- or a refusal (money_lib); REFUNDED when the original was refunded already.
-- Invariant: one refund per spend (the marker here, and a unique column in
-- Postgres); the payee never goes below zero (INSUFFICIENT_FUNDS instead).
local prior = idem_prior()
if prior then return prior end
if redis.call('EXISTS', KEY.marker) == 1 then return {'REFUNDED'} end
local amount = tonumber(ARG.amount)
-- The payee of the original pays the refund back: it is this call's payer.
local refusal = first_unloaded(KEY.payer_balance, KEY.payee_balance)
  or (ARG.revoke_media ~= '' and first_unloaded(KEY.revoke))
  or outbox_full()
  or user_gate(KEY.payee_balance, amount)
if refusal then return refusal end

local payee_balance, payer_balance = transfer(KEY.payee_balance, KEY.payer_balance, amount)
local reply = cjson.encode({balance = payer_balance, tx = ARG.tx, refunds = ARG.refunds})
outbox_add('refund', postings(ARG.payee, ARG.payer, amount), reply)
idem_record(reply)
redis.call('SET', KEY.marker, ARG.tx, 'EX', tonumber(ARG.marker_ttl_s))
if ARG.revoke_media ~= '' then redis.call('HDEL', KEY.revoke, ARG.revoke_media) end
redis.call('PUBLISH', ARG.payer_channel, 'B' .. payer_balance)
redis.call('PUBLISH', ARG.payee_channel, 'B' .. payee_balance)
return {'OK', reply}
