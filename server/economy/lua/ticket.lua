-- ticket: a fan buys a ticket to a ticket show, in one atomic call: check
-- the show's state and price, charge the price into the show's escrow,
-- record the ticket, let the fan into the show's chat if it is running, and
-- write the ledger entry.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance   the fan's balance
-- KEY.escrow_balance  the show's escrow account's balance
-- KEY.show            the show's hash ({eco}): state, price, and one field
--                     per ticket, `u:<fan>` = tokens paid, or 'r' once
--                     refused back (refunded)
-- KEY.room_show       the room's running-show marker (the room's slot): id,
--                     and a `u:<user>` field per user who sees its chat; in
--                     delivery mode `relay` its {eco} mirror, which
--                     Economy.ticket then copies onto the room's marker
--                     (Shows.ticket_granted, show_marker.lua)
-- ARG.payer, ARG.escrow  the fan's and the escrow's accounts (`u:<fan>` is
--                     also the fan's field in both hashes)
-- ARG.show            the show's id
-- ARG.room            the room the fan named: the show's own, or NO_SHOW
--
-- Returns {'OK', '{"balance":N,"tx":T,"show":S,"price":P}'}, or
-- {'OK', '{"balance":N,"show":S,"already":true}'} when the fan holds a ticket
-- already (nothing charged, no ledger entry), {'SHOW_CLOSED', state} when the
-- show has ended or was cancelled, {'NO_SHOW', show} when it is another
-- room's, or a refusal (money_lib).
-- Invariant: a fan holds at most one ticket per show, and a ticket exists
-- exactly when its tokens are in the escrow with the ledger entry in the
-- outbox; every check precedes the first write.
local refusal = idem_prior()
  or first_unloaded(KEY.show, KEY.payer_balance, KEY.escrow_balance)
  or outbox_full()
if refusal then return refusal end
if redis.call('HGET', KEY.show, 'room') ~= ARG.room then return {'NO_SHOW', ARG.show} end
local state = redis.call('HGET', KEY.show, 'state')
if state ~= 'scheduled' and state ~= 'running' then return {'SHOW_CLOSED', state} end
local paid = redis.call('HGET', KEY.show, ARG.payer)
if paid and paid ~= 'r' then
  local reply = cjson.encode({balance = balance_of(KEY.payer_balance), show = ARG.show,
                              already = true})
  idem_record(reply)
  return {'OK', reply}
end
local price = tonumber(redis.call('HGET', KEY.show, 'price'))
refusal = user_gate(KEY.payer_balance, price, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end

local payer_balance = transfer(KEY.payer_balance, KEY.escrow_balance, price)
redis.call('HSET', KEY.show, ARG.payer, price)
if redis.call('HGET', KEY.room_show, 'id') == ARG.show then
  redis.call('HSET', KEY.room_show, ARG.payer, 1)
end
local reply = cjson.encode({balance = payer_balance, tx = ARG.tx, show = ARG.show, price = price})
outbox_add('ticket', postings(ARG.payer, ARG.escrow, price), reply)
idem_record(reply)
return {'OK', reply}
