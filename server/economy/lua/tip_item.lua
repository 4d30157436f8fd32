-- tip_item: a tip of a menu item. Charge the item's CURRENT price (read
-- here, from the model's menu cache) from the fan to the room's owner AND
-- deliver the tip event, naming the item, to the room, in one atomic call.
-- A sibling of tip.lua rather than a branch in it: the amount and the event
-- are known only here, and the plain tip's hot path stays as measured.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance  the fan's balance    KEY.payee_balance  the owner's
-- KEY.menu           the owner's menu cache (hash: `p:<id>` price, `l:<id>`
--                    label; see server/keys.py); absent = not loaded
-- KEY.history        the room's history stream (the room's slot, not {eco});
--                    in relay mode the {eco} delivery stream, as in tip.lua
-- KEY.room_show      the room's running-show marker (show_state.lua; its
--                    {eco} mirror in relay mode): as in
--                    tip.lua, only the model and ticket holders tip during a
--                    ticket show, and the event is marked with it
-- KEY.room_channel   the room's pub/sub channel, which script mode SPUBLISHes
--                    on (a script publishes a sharded channel of its own
--                    slot, so it is declared); in relay mode an {eco}
--                    stand-in, unused (ARG.room_channel names the channel
--                    in the delivery entry, and the relay publishes)
-- KEY.goal, KEY.goal_escrow  the room's tip goal and an all-or-nothing
--                    goal's escrow balance, as in tip.lua (GOAL_ESCROW)
-- ARG.item           the item's id as the fan sent it
-- ARG.max_price      '' for none
-- ARG.payer, ARG.payee  the fan's and the owner's accounts
-- ARG.room_channel   the room's pub/sub channel
-- ARG.history_len, ARG.history_age_ms  its history's trim (history_add,
--                    history_lib.lua): every room-event action's, filled by
--                    the runner
-- ARG.event          the tip event JSON without amount, item.label,
--                    offset and ts (events.item_tip_event_body)
-- ARG.payee_channel  the owner's user channel
--
-- Returns {'OK', '{"balance":N,"tx":T,"offset":O,"price":P,"item":{"id","label"}}'}
-- (no offset in relay mode),
-- {'NO_ITEM', id} when the owner's menu has no such item, {'NO_TICKET',
-- show} during a ticket show the fan holds no ticket for, or a refusal
-- (money_lib), PRICE_CHANGED when the price is above max_price. The ledger
-- entry's meta is ARG.meta plus `item` {id, label}: statements name what
-- was tipped for, even after the item left the menu.
-- Invariant: tokens move only with the tip queued for delivery (history XADD
-- and PUBLISH, or its delivery entry for the relay) and its ledger entry in the outbox, at the price the fan
-- agreed to (max_price); every check precedes the first write; the fan's
-- balance never goes below zero. A retried key answers its first reply,
-- whatever the menu says now.
local prior = idem_prior()
if prior then return prior end
-- The menu first: it is loaded only for a user that exists.
local refusal = first_unloaded(KEY.menu, KEY.payer_balance, KEY.payee_balance, KEY.goal)
local goal = nil
if not refusal then
  goal = goal_open(KEY.goal)
  if goal and goal.escrow ~= '' then refusal = goal_escrow_declared(goal, KEY.goal_escrow) end
end
refusal = refusal or outbox_full() or relay_full(KEY.history)
if refusal then return refusal end
local found = redis.call('HMGET', KEY.menu, 'p:' .. ARG.item, 'l:' .. ARG.item)
if not found[1] or not found[2] then return {'NO_ITEM', ARG.item} end
local price = tonumber(found[1])
if ARG.max_price ~= '' and price > tonumber(ARG.max_price) then
  return {'PRICE_CHANGED', tostring(price)}
end
refusal = user_gate(KEY.payer_balance, price, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end
local show = redis.call('HGET', KEY.room_show, 'id')
if show and redis.call('HEXISTS', KEY.room_show, ARG.payer) == 0 then
  return {'NO_TICKET', show}
end

local item = {id = ARG.item, label = found[2]}
local event = cjson.decode(ARG.event)
event.amount = price
event.item = item
event = cjson.encode(event)
if show then event = string.sub(event, 1, -2) .. ',"in_show":"' .. show .. '"}' end
local meta = cjson.decode(ARG.meta)
meta.item = item

-- An all-or-nothing goal holds the tip: its escrow is the payee.
local payee, payee_key = ARG.payee, KEY.payee_balance
if goal and goal.escrow ~= '' then payee, payee_key = goal.escrow, KEY.goal_escrow end
local fan_balance, owner_balance = transfer(KEY.payer_balance, payee_key, price)
local offset = room_event(KEY.history, ARG.history_len, ARG.history_age_ms, KEY.room_channel,
  event)
local reply = {balance = fan_balance, tx = ARG.tx, offset = offset, price = price, item = item}
if goal then
  reply.goal = goal_count(KEY.goal, goal, price, KEY.history, ARG.history_len,
    ARG.history_age_ms, KEY.room_channel)
  meta.goal = goal.id
end
relay_flush(KEY.history, ARG.room_channel)
reply = cjson.encode(reply)
outbox_add('tip', postings(ARG.payer, payee, price), reply, cjson.encode(meta))
idem_record(reply)
if payee == ARG.payee then redis.call('PUBLISH', ARG.payee_channel, 'B' .. owner_balance) end
return {'OK', reply}
