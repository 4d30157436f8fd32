-- dm: charge the recipient's current DM price AND deliver the message, in one
-- atomic call. The price is read here, so `max_price` is checked against the
-- very price charged.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance  the sender's balance KEY.payee_balance  the recipient's
-- KEY.prices         the recipient's prices hash (field `dm`)
-- KEY.inbox          the recipient's inbox stream
-- ARG.max_price      '' for none
-- ARG.payer, ARG.payee  the sender's and the recipient's accounts
-- ARG.event          the dm event JSON without price/tx/ts, its closing
--                    brace removed
-- ARG.payee_channel  the recipient's user channel
-- ARG.inbox_len      inbox entries kept
-- KEY.blocks         the recipient's blocks set (blocks_load.lua)
-- KEY.dm_log         the DM archive stream (server/catalog/dms.py)
-- ARG.sender, ARG.recipient  the two user ids
-- ARG.dm_log_max     archive entries Redis may hold for Postgres
--
-- Returns {'OK', '{"balance":N,"price":P,"tx":T}'}, {'BLOCKED'} when the
-- recipient blocks the sender, or a refusal (money_lib).
-- Invariant: a paid message is delivered (inbox XADD, PUBLISH) exactly when
-- its price moved and its ledger entry is in the outbox; a free one (price 0)
-- moves nothing and has no ledger entry; all checks precede the first write;
-- a recipient whose prices are not loaded is looked up before their balance,
-- so a DM to a user who does not exist leaves no key behind; a blocked
-- sender is refused inside the very call that would charge, so no block
-- committed before the call can be raced; every delivered DM is appended to
-- the archive stream in the same call (Postgres copies it off the hot path).
local prior = idem_prior()
if prior then return prior end
-- The prices hash first: it is loaded only for a user that exists, so a DM
-- to an unknown user stops here, before any balance of theirs is loaded.
local refusal = first_unloaded(KEY.prices, KEY.blocks, KEY.payer_balance, KEY.payee_balance)
  or outbox_full()
if refusal then return refusal end
if redis.call('SISMEMBER', KEY.blocks, ARG.sender) == 1 then return {'BLOCKED'} end
-- The archive's own bound: Postgres away too long stops DMs, as the outbox
-- stops spends, before Redis memory runs out.
if redis.call('XLEN', KEY.dm_log) >= tonumber(ARG.dm_log_max) then return {'BACKLOG'} end
local price = tonumber(redis.call('HGET', KEY.prices, 'dm') or '0')
if ARG.max_price ~= '' and price > tonumber(ARG.max_price) then
  return {'PRICE_CHANGED', tostring(price)}
end
refusal = user_gate(KEY.payer_balance, price, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end

local sender_balance, recipient_balance
if price > 0 then
  sender_balance, recipient_balance = transfer(KEY.payer_balance, KEY.payee_balance, price)
else
  sender_balance = balance_of(KEY.payer_balance)
end
local reply = cjson.encode({balance = sender_balance, price = price, tx = ARG.tx})
if price > 0 then
  outbox_add('dm', postings(ARG.payer, ARG.payee, price), reply)
end
local now = redis.call('TIME')
local ts = tostring(now[1] * 1000 + math.floor(now[2] / 1000))
local event = ARG.event .. ',"price":' .. price .. ',"tx":"' .. ARG.tx .. '","ts":' .. ts .. '}'
local inbox_id = redis.call('XADD', KEY.inbox, 'MAXLEN', '~', ARG.inbox_len, '*', 'e', event)
redis.call('PUBLISH', ARG.payee_channel, 'D' .. inbox_id .. ' ' .. event)
redis.call('XADD', KEY.dm_log, '*', 'to', ARG.recipient, 'e', event)
if recipient_balance then redis.call('PUBLISH', ARG.payee_channel, 'B' .. recipient_balance) end
idem_record(reply)
return {'OK', reply}
