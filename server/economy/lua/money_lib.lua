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
-- Common to every action that spends a user's tokens (Action.limited):
--   keys payer_limits and payer_spent: her limits and counters, passed to
--                user_gate (below)
--   Idempotency record: request .. "\n" .. reply, kept 24 hours.
--   Replies: {'OK', reply_json} | {'DUP', reply_json} | {'CONFLICT'} |
--            {'NOT_LOADED', key} | {'INSUFFICIENT_FUNDS', balance} |
--            {'PRICE_CHANGED', price} | {'BACKLOG'} |
--            {'SPEND_LIMIT', '{"window","remaining","resets_at"}'} |
--            {'SELF_EXCLUDED', until_ms}, and each action's own; tips
--            also {'GOAL_ESCROW', key} (goal_escrow_declared, below).
-- Order in every script: idem_prior first; every check before the first
-- write (Redis does not roll back a script that fails halfway); user_gate
-- last of the checks, once first_unloaded has seen its balance loaded.

local IDEM_TTL_S = 86400

-- Delivery of a room event (docs/economy.md, "Delivery relay"). RELAY is
-- set by the loader from the deployment's delivery mode
-- (server/economy/scripts.py, money_script): false, the event goes into the
-- room's history and out on its channel in this very call; true (Redis
-- Cluster, where the room is another slot), the call's events go into the
-- {eco} delivery stream in one entry, for the relay to move to the room.
-- Each script calls room_event for every event it delivers and relay_flush
-- once, after its last event. In relay mode a script's delivery keys are
-- passed their {eco} stand-ins (Economy._room_delivery_keys): the history
-- key is the delivery stream, the room's show marker its mirror.
local RELAYED = {}

-- The event's offset in script mode; nil in relay mode (no offset exists
-- until the relay writes the room's history).
local function room_event(history_key, history_len, history_age_ms, channel, event)
  if RELAY then
    RELAYED[#RELAYED + 1] = event
    return nil
  end
  local offset = history_add(history_key, event, history_len, history_age_ms)
  redis.call('SPUBLISH', channel, 'E' .. offset .. ' ' .. event)
  return offset
end

-- Relay mode: the call's events, one delivery entry named by the
-- transaction (the relay's dedupe key), with the room's channel (the room
-- is its hash tag). A writer: after every check. Newlines separate the
-- events: cjson escapes every newline inside a JSON string.
local function relay_flush(deliveries_key, channel)
  if RELAY and #RELAYED > 0 then
    redis.call('XADD', deliveries_key, '*', 'tx', ARG.tx, 'channel', channel,
      'events', table.concat(RELAYED, '\n'))
  end
end

-- BACKLOG in relay mode when the delivery stream holds as many entries as
-- the outbox may (ARG.outbox_max): no relay is draining it, and spends stop
-- before Redis memory runs out, as for the outbox.
local function relay_full(deliveries_key)
  if RELAY and redis.call('XLEN', deliveries_key) >= tonumber(ARG.outbox_max) then
    return {'BACKLOG'}
  end
  return nil
end

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

-- Spending limits and self-exclusion (docs/economy.md, "Spending limits").
-- A fan's limits hash (Keys.limits: `v` version, `x` excluded until (ms),
-- and per window w in d/w/m: `w` the limit, `wp` a pending raise's value
-- ('' = none) and `wa` when it applies (ms)) and her counters hash
-- (Keys.spent: per window `wn` its index and `ws` tokens spent in it, plus
-- `t` spent in total). Windows are calendar ones in UTC, from the script's
-- own clock (TIME): the day, the ISO week (from Monday) and the month.
local DAY_MS = 86400000

-- (year, month) of a day number since 1970-01-01 (H. Hinnant's algorithm).
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- The day number of the first of a month.
local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The spend user_gate let through, for transfer() to count (GATE_SPENT nil:
-- none): the counters' key, each window's index and tokens spent in it
-- (scalars, not tables: this runs on every tip).
local GATE_BALANCE, GATE_SPENT, GATE_T
local GATE_D, GATE_DS, GATE_W, GATE_WS, GATE_M, GATE_MS

-- SPEND_LIMIT when `used + debit` passes a window's limit in force at `now`
-- (a pending raise whose time came applies); nil else.
local function over(name, limit, pending, at, used, debit, now, resets)
  if at and tonumber(at) <= now then limit = pending end
  if limit and limit ~= '' and used + debit > tonumber(limit) then
    return {'SPEND_LIMIT', cjson.encode({window = name,
      remaining = math.max(tonumber(limit) - used, 0), resets_at = resets})}
  end
  return nil
end

-- SELF_EXCLUDED {until} while the user's self-exclusion runs (purchases
-- call this alone); NOT_LOADED when her limits are not in Redis.
local function excluded(limits_key, now)
  local found = redis.call('HMGET', limits_key, 'v', 'x')
  if not found[1] then return {'NOT_LOADED', limits_key} end
  if found[2] and tonumber(found[2]) > (now or now_ms()) then
    return {'SELF_EXCLUDED', found[2]}
  end
  return nil
end

-- THE per-user check of every paid action: each script passes the user it
-- charges (or, for a credit, the user it credits, with debit 0) through
-- here exactly once, after its balances are known to be loaded. The funds
-- check; and for a spend (limits_key and spent_key given, debit > 0) the
-- self-exclusion and the spending limits, each window's counter read here
-- and advanced by transfer() in the same call. nil, or the refusal to return.
local function user_gate(balance_key, debit, limits_key, spent_key)
  if limits_key and debit > 0 then
    local now = now_ms()
    local lim = redis.call('HMGET', limits_key, 'v', 'x',
      'd', 'dp', 'da', 'w', 'wp', 'wa', 'm', 'mp', 'ma')
    if not lim[1] then return {'NOT_LOADED', limits_key} end
    if lim[2] and tonumber(lim[2]) > now then return {'SELF_EXCLUDED', lim[2]} end
    local spent = redis.call('HMGET', spent_key, 't', 'dn', 'ds', 'wn', 'ws', 'mn', 'ms')
    if not spent[1] then return {'NOT_LOADED', spent_key} end
    -- The windows at `now`: the day, the ISO week (1970-01-01 was a
    -- Thursday), the month; a counter of another window index counts 0.
    local day = math.floor(now / DAY_MS)
    local week = math.floor((day + 3) / 7)
    local y, m = civil_from_days(day)
    local month = y * 12 + m - 1
    local ds = tonumber(spent[2]) == day and tonumber(spent[3]) or 0
    local ws = tonumber(spent[4]) == week and tonumber(spent[5]) or 0
    local ms = tonumber(spent[6]) == month and tonumber(spent[7]) or 0
    if lim[3] or lim[5] or lim[6] or lim[8] or lim[9] or lim[11] then
      local ny, nm = y, m + 1
      if nm > 12 then ny, nm = y + 1, 1 end
      local refusal = over('daily', lim[3], lim[4], lim[5], ds, debit, now, (day + 1) * DAY_MS)
        or over('weekly', lim[6], lim[7], lim[8], ws, debit, now, (week * 7 + 4) * DAY_MS)
        or over('monthly', lim[9], lim[10], lim[11], ms, debit, now,
                days_from_civil(ny, nm) * DAY_MS)
      if refusal then return refusal end
    end
    GATE_BALANCE, GATE_SPENT, GATE_T = balance_key, spent_key, tonumber(spent[1])
    GATE_D, GATE_DS, GATE_W, GATE_WS, GATE_M, GATE_MS = day, ds, week, ws, month, ms
  end
  local balance = balance_of(balance_key)
  if balance < debit then return {'INSUFFICIENT_FUNDS', tostring(balance)} end
  return nil
end

-- A spend's tokens into the counters of the gated payer (a writer: called by
-- transfer() only), in one HSET.
local function count_spend(amount)
  GATE_T, GATE_DS, GATE_WS, GATE_MS = GATE_T + amount, GATE_DS + amount,
    GATE_WS + amount, GATE_MS + amount
  redis.call('HSET', GATE_SPENT, 't', GATE_T, 'dn', GATE_D, 'ds', GATE_DS,
    'wn', GATE_W, 'ws', GATE_WS, 'mn', GATE_M, 'ms', GATE_MS)
end

-- A debit of the payer user_gate let through counts toward her limits.
local function transfer(payer_key, payee_key, amount)
  if GATE_SPENT and payer_key == GATE_BALANCE and amount > 0 then count_spend(amount) end
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

-- An all-or-nothing goal's escrow balance, the tip's payee, must be a key
-- the call declared (Redis Cluster routes a script by its KEYS), but only
-- the goal's hash names it: GOAL_ESCROW {its key} when the call declared
-- another (the runner calls again with that key, and remembers it for the
-- room); else NOT_LOADED when its balance is missing, or nil.
local function goal_escrow_declared(goal, declared_key)
  if goal.escrow_key ~= declared_key then return {'GOAL_ESCROW', goal.escrow_key} end
  return first_unloaded(declared_key)
end

-- Count `amount` toward the goal (a writer: call it after every check) and
-- deliver its `goal` event after the tip's (room_event: stored and
-- published as the tip, or relayed in the tip's delivery entry); the goal
-- turns `reached` with the tip that reaches its target. Returns the event's `goal` field, which the tip's reply carries.
local function goal_count(goal_key, goal, amount, history_key, history_len, history_age_ms,
    channel)
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
  room_event(history_key, history_len, history_age_ms, channel, event)
  return summary
end
