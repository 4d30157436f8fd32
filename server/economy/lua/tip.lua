-- tip: move `amount` from the fan to the room's owner AND deliver the tip
-- event to the room, in one atomic call.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance  the fan's balance    KEY.payee_balance  the owner's
-- KEY.history        the room's history stream (the room's slot, not {eco});
--                    in relay mode the {eco} delivery stream (room_event)
-- KEY.room_show      the room's running-show marker (show_state.lua; in
--                    relay mode its {eco} mirror, same fields): while
--                    a ticket show runs, only its model and ticket holders
--                    may tip, and the event is marked with the show
-- KEY.room_channel   the room's pub/sub channel, which script mode SPUBLISHes
--                    on (a script publishes a sharded channel of its own
--                    slot, so it is declared); in relay mode an {eco}
--                    stand-in, unused (ARG.room_channel names the channel
--                    in the delivery entry, and the relay publishes)
-- KEY.goal           the room's tip goal ({eco}, Keys.goal): an active goal
--                    counts the tip (goal_count, money_lib), and an
--                    all-or-nothing one takes its tokens into its escrow
-- KEY.goal_escrow    that escrow's balance ({eco}) as the caller knows it
--                    (the goal hash names it; any {eco} key while the
--                    caller knows none): GOAL_ESCROW {the hash's key} when
--                    an all-or-nothing goal is active and this is not it
-- ARG.amount         tokens, > 0          ARG.tip_min  the room's minimum
-- ARG.payer, ARG.payee  the fan's and the owner's accounts
-- ARG.room_channel   the room's pub/sub channel
-- ARG.history_len, ARG.history_age_ms  its history's trim (history_add,
--                    history_lib.lua): every room-event action's, filled by
--                    the runner
-- ARG.event          the tip event JSON without offset/ts
-- ARG.payee_channel  the owner's user channel
--
-- Returns {'OK', '{"balance":N,"tx":T,"offset":O}'} (no offset in relay
-- mode: the tip is not in the room's history yet) (plus "goal":{...} when
-- it counted toward a goal), {'GOAL_ESCROW', key}, {'TIP_MIN', tip_min}
-- when the amount is under it, {'NO_TICKET', show} during a ticket show the
-- fan holds no ticket for, or a refusal (money_lib). tip_min is checked
-- after the idempotency key, so a tip retried after the model raised her
-- minimum is still answered with its original reply.
-- Invariant: tokens move only with the tip queued for delivery (history XADD
-- and PUBLISH, or its delivery entry for the relay) and its ledger entry in
-- the outbox; every check precedes the
-- first write; the fan's balance never goes below zero.
local amount = tonumber(ARG.amount)
local refusal = idem_prior()
if not refusal and amount < tonumber(ARG.tip_min) then refusal = {'TIP_MIN', ARG.tip_min} end
refusal = refusal or first_unloaded(KEY.payer_balance, KEY.payee_balance, KEY.goal)
local goal = nil
if not refusal then
  goal = goal_open(KEY.goal)
  if goal and goal.escrow ~= '' then refusal = goal_escrow_declared(goal, KEY.goal_escrow) end
end
refusal = refusal
  or outbox_full()
  or relay_full(KEY.history)
  or user_gate(KEY.payer_balance, amount, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end
local event = ARG.event
local show = redis.call('HGET', KEY.room_show, 'id')
if show then
  if redis.call('HEXISTS', KEY.room_show, ARG.payer) == 0 then return {'NO_TICKET', show} end
  event = string.sub(event, 1, -2) .. ',"in_show":"' .. show .. '"}'
end

-- An all-or-nothing goal holds the tip: its escrow is the payee.
local payee, payee_key = ARG.payee, KEY.payee_balance
if goal and goal.escrow ~= '' then payee, payee_key = goal.escrow, KEY.goal_escrow end
local fan_balance, owner_balance = transfer(KEY.payer_balance, payee_key, amount)
local offset = room_event(KEY.history, ARG.history_len, ARG.history_age_ms, KEY.room_channel,
  event)
if not goal then
  relay_flush(KEY.history, ARG.room_channel)
  local reply = cjson.encode({balance = fan_balance, tx = ARG.tx, offset = offset})
  outbox_add('tip', postings(ARG.payer, ARG.payee, amount), reply)
  idem_record(reply)
  redis.call('PUBLISH', ARG.payee_channel, 'B' .. owner_balance)
  return {'OK', reply}
end
local counted = goal_count(KEY.goal, goal, amount, KEY.history, ARG.history_len,
    ARG.history_age_ms, KEY.room_channel)
relay_flush(KEY.history, ARG.room_channel)
local reply = cjson.encode({balance = fan_balance, tx = ARG.tx, offset = offset, goal = counted})
-- The ledger entry names the goal: its progress and held tips are rebuilt from it.
local meta = string.sub(ARG.meta, 1, -2) .. ',"goal":"' .. goal.id .. '"}'
outbox_add('tip', postings(ARG.payer, payee, amount), reply, meta)
idem_record(reply)
if payee == ARG.payee then redis.call('PUBLISH', ARG.payee_channel, 'B' .. owner_balance) end
return {'OK', reply}
