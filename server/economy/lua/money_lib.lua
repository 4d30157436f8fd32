-- money_lib: helpers shared by every money script. The loader prepends this
-- file to each of them (Redis scripts cannot include one another), so each
-- script stays ONE atomic call. Each helper only reads; writes happen in the
-- scripts, after every check.
--
-- Conventions of every money script:
--   KEYS[1] idempotency key, KEYS[2] ledger outbox stream, then balance keys.
--   ARGV[1] request fingerprint (JSON, never contains a raw newline),
--   ARGV[2] transaction id, ARGV[3] outbox bound (entries).
--   Idempotency record: request .. "\n" .. reply, kept 24 hours.
--   Replies: {'OK', reply_json} | {'DUP', reply_json} | {'CONFLICT'} |
--            {'NOT_LOADED', key} | {'INSUFFICIENT_FUNDS', balance} |
--            {'PRICE_CHANGED', price} | {'BACKLOG'} | {'REFUNDED'}

local IDEM_TTL_S = 86400

-- The earlier outcome of this key: DUP with its reply, or CONFLICT when the
-- same key came with other fields; nil when the key is new.
local function idem_prior()
  local prior = redis.call('GET', KEYS[1])
  if not prior then return nil end
  local sep = string.find(prior, '\n', 1, true)
  if sep and string.sub(prior, 1, sep - 1) == ARGV[1] then
    return {'DUP', string.sub(prior, sep + 1)}
  end
  return {'CONFLICT'}
end

-- NOT_LOADED for the first balance key (KEYS[first..last]) that is missing:
-- a missing balance is never read as zero; the caller loads it and retries.
local function first_unloaded(first, last)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 0 then return {'NOT_LOADED', KEYS[i]} end
  end
  return nil
end

-- BACKLOG when the outbox holds as many entries as it may: Postgres has been
-- away too long, and spends stop before Redis memory runs out.
local function outbox_full()
  if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then return {'BACKLOG'} end
  return nil
end

local function balance_of(key)
  return tonumber(redis.call('GET', key))
end

-- Append the ledger entry (postings: "account amount account amount ...").
-- Returns the entry id, whose millisecond part is when the ledger says it
-- happened.
local function outbox_add(kind, initiator, key, postings, reply, meta)
  return redis.call('XADD', KEYS[2], '*',
    'tx', ARGV[2], 'kind', kind, 'initiator', initiator, 'key', key,
    'request', ARGV[1], 'reply', reply, 'postings', postings, 'meta', meta)
end

-- nil when KEYS[first..last] are loaded, the outbox has room and the payer
-- holds `amount`; otherwise the refusal to return. Reads only.
local function funds_refusal(first, last, payer_key, amount)
  local refusal = first_unloaded(first, last) or outbox_full()
  if refusal then return refusal end
  local balance = balance_of(payer_key)
  if balance < amount then return {'INSUFFICIENT_FUNDS', tostring(balance)} end
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

local function idem_record(reply)
  redis.call('SET', KEYS[1], ARGV[1] .. '\n' .. reply, 'EX', IDEM_TTL_S)
end
