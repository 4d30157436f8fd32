-- money_lib: the steps every paid action shares. The loader prepends this
-- file to each action's script (Redis scripts cannot include one another),
-- so each script stays ONE atomic call, and binds the names below to
-- KEYS/ARGV positions from the action's declaration
-- (server/economy/actions.py). Each helper only reads, except the writers
-- named as such (transfer, outbox_add, idem_record), which a script calls
-- after every check.
--
-- Common to every paid action (declared once, in actions.py):
--   KEY.idem     the idempotency record of (initiator, key)
--   KEY.outbox   the ledger outbox stream
--   ARG.request  request fingerprint (JSON, never contains a raw newline)
--   ARG.tx       the new transaction's id
--   ARG.outbox_max  outbox bound (entries)
--   ARG.initiator   who asked (owner of the idempotency key)
--   ARG.key      the idempotency key as given
--   ARG.meta     meta JSON for the ledger
--   Idempotency record: request .. "\n" .. reply, kept 24 hours.
--   Replies: {'OK', reply_json} | {'DUP', reply_json} | {'CONFLICT'} |
--            {'NOT_LOADED', key} | {'INSUFFICIENT_FUNDS', balance} |
--            {'PRICE_CHANGED', price} | {'BACKLOG'}, and each action's own.
-- Order in every script: idem_prior first; every check before the first
-- write (Redis does not roll back a script that fails halfway); user_gate
-- last of the checks, once first_unloaded has seen its balance loaded.

local IDEM_TTL_S = 86400

-- The earlier outcome of this key: DUP with its reply, or CONFLICT when the
-- same key came with other fields; nil when the key is new.
local function idem_prior()
  local prior = redis.call('GET', KEY.idem)
  if not prior then return nil end
  local sep = string.find(prior, '\n', 1, true)
  if sep and string.sub(prior, 1, sep - 1) == ARG.request then
    return {'DUP', string.sub(prior, sep + 1)}
  end
  return {'CONFLICT'}
end

-- NOT_LOADED for the first of the given keys (balances, a price hash) that
-- is missing: a missing balance is never read as zero; the caller loads it
-- and retries.
local function first_unloaded(...)
  for _, key in ipairs({...}) do
    if redis.call('EXISTS', key) == 0 then return {'NOT_LOADED', key} end
  end
  return nil
end

-- BACKLOG when the outbox holds as many entries as it may: Postgres has been
-- away too long, and spends stop before Redis memory runs out.
local function outbox_full()
  if redis.call('XLEN', KEY.outbox) >= tonumber(ARG.outbox_max) then return {'BACKLOG'} end
  return nil
end

local function balance_of(key)
  return tonumber(redis.call('GET', key))
end

-- THE per-user check of every paid action: each script passes the user it
-- charges (or, for a credit, the user it credits, with debit 0) through
-- here exactly once, after its balances are known to be loaded. Today it is
-- the funds check; a check that every kind must obey (spending limits,
-- self-exclusion) belongs here, once. nil, or the refusal to return.
local function user_gate(balance_key, debit)
  local balance = balance_of(balance_key)
  if balance < debit then return {'INSUFFICIENT_FUNDS', tostring(balance)} end
  return nil
end

-- Move `amount` from one balance to another (the only place that writes
-- balances); returns both new balances.
local function transfer(payer_key, payee_key, amount)
  return redis.call('DECRBY', payer_key, amount), redis.call('INCRBY', payee_key, amount)
end

-- The postings of a transfer, in the outbox entry's format.
local function postings(payer_account, payee_account, amount)
  return payer_account .. ' ' .. (-amount) .. ' ' .. payee_account .. ' ' .. amount
end

-- Append the ledger entry (postings: "account amount account amount ...");
-- tx, request, initiator and key are the call's own; meta is ARG.meta
-- unless the script passes its own (what only the script knows, like a
-- menu item's label). Returns the entry id, whose millisecond part is when
-- the ledger says it happened.
local function outbox_add(kind, entry_postings, reply, meta)
  return redis.call('XADD', KEY.outbox, '*',
    'tx', ARG.tx, 'kind', kind, 'initiator', ARG.initiator, 'key', ARG.key,
    'request', ARG.request, 'reply', reply, 'postings', entry_postings,
    'meta', meta or ARG.meta)
end

local function idem_record(reply)
  redis.call('SET', KEY.idem, ARG.request .. '\n' .. reply, 'EX', IDEM_TTL_S)
end

-- Tip goals (tip.lua and tip_item.lua; server/economy/goals.py). A room's
-- goal hash (Keys.goal) is written by goal_state.lua and show_load.lua;
-- these read it and count a tip toward it, in the tip's own call.

-- The goal a tip in the room counts toward: nil when the room has none
-- active (id '' or another state), else its fields. `escrow` is '' unless
-- the goal is all-or-nothing: then the tip's tokens go to that account.
local function goal_open(goal_key)
  local g = redis.call('HMGET', goal_key, 'id', 'state', 'target', 'progress', 'escrow',
    'escrow_key', 'title', 'room', 'aon', 'deadline')
  if not g[1] or g[1] == '' or g[2] ~= 'active' then return nil end
  return {id = g[1], target = tonumber(g[3]), progress = tonumber(g[4]), escrow = g[5],
    escrow_key = g[6], title = g[7], room = g[8], aon = g[9] == '1', deadline = g[10]}
end

-- Count `amount` toward the goal (a writer: call it after every check) and
-- store and publish its `goal` event after the tip's, in the room's history
-- (`E`, as the tip); the goal turns `reached` with the tip that reaches its
-- target. Returns the event's `goal` field, which the tip's reply carries.
local function goal_count(goal_key, goal, amount, history_key, history_len, channel)
  local progress = redis.call('HINCRBY', goal_key, 'progress', amount)
  local state = 'active'
  if progress >= goal.target then
    state = 'reached'
    redis.call('HSET', goal_key, 'state', state)
  end
  local deadline = cjson.null
  if goal.deadline and goal.deadline ~= '' then deadline = tonumber(goal.deadline) end
  local summary = {id = goal.id, title = goal.title, target = goal.target, progress = progress,
    state = state, all_or_nothing = goal.aon, deadline = deadline}
  local event = cjson.encode({type = 'goal', room = goal.room, goal = summary})
  local offset = redis.call('XADD', history_key, 'MAXLEN', history_len, '*', 'e', event)
  redis.call('PUBLISH', channel, 'E' .. offset .. ' ' .. event)
  return summary
end
