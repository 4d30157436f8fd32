-- unlock: charge locked media's current price and grant the fan access to
-- it, for good, in one atomic call.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance  the fan's balance    KEY.payee_balance  the owner's
-- KEY.media          the media's hash (owner, price, ...; Keys.media)
-- KEY.entitlement    the fan's unlocks: media id -> unlock tx, plus `*`
-- ARG.max_price      '' for none
-- ARG.payer, ARG.payee  the fan's and the owner's accounts
-- ARG.media_id       the media's id
-- ARG.payee_channel  the owner's user channel
--
-- Returns {'OK', '{"balance":N,"price":P,"tx":T}'}; for media the caller
-- owns already (unlocked before, with any key, or her own), OK with
-- '{"balance":N,"price":0,"tx":T|null,"already":true}' and nothing charged
-- (T: the unlock that granted it; null for the owner); or a refusal
-- (money_lib). The idempotency key is checked first, so a retry of a paid
-- unlock is a duplicate, not "already".
-- Invariant: access is granted exactly when the price moved and its ledger
-- entry is in the outbox; media is never paid for twice by one fan; every
-- check precedes the first write.
local prior = idem_prior()
if prior then return prior end
-- The media first: it is loaded only when it exists. Its owner field (not
-- the key) proves it loaded: a price update may create the hash with its
-- price alone.
if redis.call('HEXISTS', KEY.media, 'owner') == 0 then return {'NOT_LOADED', KEY.media} end
local refusal = first_unloaded(KEY.entitlement, KEY.payer_balance, KEY.payee_balance)
if refusal then return refusal end

local granted_by = redis.call('HGET', KEY.entitlement, ARG.media_id)
if granted_by or ARG.payer == ARG.payee then
  local reply = cjson.encode({
    balance = balance_of(KEY.payer_balance), price = 0,
    tx = granted_by or cjson.null, already = true})
  idem_record(reply)
  return {'OK', reply}
end

local price = tonumber(redis.call('HGET', KEY.media, 'price'))
if ARG.max_price ~= '' and price > tonumber(ARG.max_price) then
  return {'PRICE_CHANGED', tostring(price)}
end
refusal = outbox_full() or user_gate(KEY.payer_balance, price, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end

local fan_balance, owner_balance = transfer(KEY.payer_balance, KEY.payee_balance, price)
redis.call('HSET', KEY.entitlement, ARG.media_id, ARG.tx)
local reply = cjson.encode({balance = fan_balance, price = price, tx = ARG.tx})
outbox_add('unlock', postings(ARG.payer, ARG.payee, price), reply)
idem_record(reply)
redis.call('PUBLISH', ARG.payee_channel, 'B' .. owner_balance)
return {'OK', reply}
