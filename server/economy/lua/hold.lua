-- hold: move `amount` from a user into the escrow account of one held
-- object (a custom request's offer; later a show ticket, a private show's
-- minimum), in one atomic call.
--
-- KEY.idem, KEY.outbox, ARG.request, ARG.tx, ARG.outbox_max, ARG.initiator,
-- ARG.key, ARG.meta: common to every paid action (money_lib.lua).
-- KEY.payer_balance   the user's balance
-- KEY.escrow_balance  the object's escrow account's balance
-- ARG.amount          tokens, > 0
-- ARG.payer, ARG.escrow  the user's and the escrow's accounts
-- ARG.subject         the held object's id (`r_...`), echoed in the reply
--
-- Returns {'OK', '{"balance":N,"tx":T,"subject":S}'} (N: the user's balance)
-- or a refusal (money_lib). A retried key answers the original reply, with
-- the original subject, whatever subject the retry named.
-- Invariant: tokens enter an escrow only from the user who pays, through the
-- user gate, with the ledger entry in the outbox; every check precedes the
-- first write.
local amount = tonumber(ARG.amount)
local refusal = idem_prior()
  or first_unloaded(KEY.payer_balance, KEY.escrow_balance)
  or outbox_full()
  or user_gate(KEY.payer_balance, amount, KEY.payer_limits, KEY.payer_spent)
if refusal then return refusal end

local payer_balance = transfer(KEY.payer_balance, KEY.escrow_balance, amount)
local reply = cjson.encode({balance = payer_balance, tx = ARG.tx, subject = ARG.subject})
outbox_add('hold', postings(ARG.payer, ARG.escrow, amount), reply)
idem_record(reply)
return {'OK', reply}
