-- dm: charge the recipient's current DM price AND deliver the message, in one
-- atomic call. The price is read here, so `max_price` is checked against the
-- very price charged.
--
-- KEYS[1] idempotency key        KEYS[2] ledger outbox
-- KEYS[3] sender's balance       KEYS[4] recipient's balance
-- KEYS[5] recipient's prices hash (field `dm`)
-- KEYS[6] recipient's inbox stream
-- ARGV[1] request fingerprint    ARGV[2] transaction id   ARGV[3] outbox bound
-- ARGV[4] max_price ('' for none) ARGV[5] sender's account ARGV[6] recipient's account
-- ARGV[7] initiator (user id)    ARGV[8] idempotency key as the client sent it
-- ARGV[9] dm event JSON without price/tx/ts, its closing brace removed
-- ARGV[10] recipient's user channel  ARGV[11] inbox length kept
-- ARGV[12] meta JSON for the ledger
--
-- Returns {'OK', '{"balance":N,"price":P,"tx":T}'} or a refusal (money_lib).
-- Invariant: a paid message is delivered (inbox XADD, PUBLISH) exactly when
-- its price moved and its ledger entry is in the outbox; a free one (price 0)
-- moves nothing and has no ledger entry; all checks precede the first write;
-- a recipient whose prices are not loaded is looked up before their balance,
-- so a DM to a user who does not exist leaves no key behind.
local prior = idem_prior()
if prior then return prior end
-- The prices hash first: it is loaded only for a user that exists, so a DM
-- to an unknown user stops here, before any balance of theirs is loaded.
local refusal = first_unloaded(5, 5) or first_unloaded(3, 4) or outbox_full()
if refusal then return refusal end
local price = tonumber(redis.call('HGET', KEYS[5], 'dm') or '0')
if ARGV[4] ~= '' and price > tonumber(ARGV[4]) then
  return {'PRICE_CHANGED', tostring(price)}
end
local balance = balance_of(KEYS[3])
if balance < price then return {'INSUFFICIENT_FUNDS', tostring(balance)} end

local sender_balance, recipient_balance = balance, nil
if price > 0 then
  sender_balance, recipient_balance = transfer(KEYS[3], KEYS[4], price)
end
local reply = cjson.encode({balance = sender_balance, price = price, tx = ARGV[2]})
if price > 0 then
  outbox_add('dm', ARGV[7], ARGV[8], postings(ARGV[5], ARGV[6], price), reply, ARGV[12])
end
local now = redis.call('TIME')
local ts = tostring(now[1] * 1000 + math.floor(now[2] / 1000))
local event = ARGV[9] .. ',"price":' .. price .. ',"tx":"' .. ARGV[2] .. '","ts":' .. ts .. '}'
local inbox_id = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*', 'e', event)
redis.call('PUBLISH', ARGV[10], 'D' .. inbox_id .. ' ' .. event)
if recipient_balance then redis.call('PUBLISH', ARGV[10], 'B' .. recipient_balance) end
idem_record(reply)
return {'OK', reply}
