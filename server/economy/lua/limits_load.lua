-- limits_load: put a user's spending limits (her spend_limits row) and, when
-- loading, her per-window counters (summed from the ledger) into Redis.
--
-- KEYS[1] the epoch key   KEYS[2] her limits hash   KEYS[3] her counters hash
-- ARGV[1] 'load' (a script found a hash missing) or 'set' (her row changed)
-- ARGV[2] the epoch the caller saw before reading Postgres ('load')
-- ARGV[3] the row's version
-- ARGV[4] the limits hash's fields, JSON [field, value, ...] (without `v`)
-- ARGV[5] the counters hash's fields, JSON [field, value, ...], or ''
--
-- Returns 'OK', 'KEPT' ('set': Redis holds this version or a newer one) or
-- 'EPOCH' ('load': Redis was reset since the caller read Postgres).
-- Invariant: each hash is written by a load only if absent, behind the epoch
-- fence (as load_balance.lua), so counters that spends advanced are never
-- replaced by the ledger's older sum; limits are replaced only by a newer
-- version of the row.
local function write(key, fields_json, version)
  local fields = cjson.decode(fields_json)
  if version then
    fields[#fields + 1] = 'v'
    fields[#fields + 1] = version
  end
  if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
end

if ARGV[1] == 'load' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 'EPOCH' end
  if redis.call('EXISTS', KEYS[2]) == 0 then write(KEYS[2], ARGV[4], ARGV[3]) end
  if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then write(KEYS[3], ARGV[5]) end
  return 'OK'
end
local held = redis.call('HGET', KEYS[2], 'v')
if held and tonumber(held) >= tonumber(ARGV[3]) then return 'KEPT' end
redis.call('DEL', KEYS[2])
write(KEYS[2], ARGV[4], ARGV[3])
return 'OK'
