-- load_entitlements: put a user's unlocked media (from the Postgres ledger)
-- into Redis, unless Redis lost its data (or someone else loaded them) since
-- the caller read Postgres.
--
-- KEYS[1] the epoch key          KEYS[2] the user's entitlements hash
-- ARGV[1] the epoch the caller saw before reading Postgres
-- ARGV[2..] pairs: media id, the unlock's transaction id
--
-- Returns 'OK' (loaded), 'EXISTS' (already loaded: nothing written) or
-- 'EPOCH' (Redis was reset meanwhile: read Postgres again).
-- Invariant (the fence of load_balance.lua): written only if absent, and
-- only into the Redis whose epoch the caller saw, so a slow load never
-- drops an unlock applied since. The field `*` marks the hash loaded even
-- when the user unlocked nothing (Redis has no empty hashes).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'EPOCH' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'EXISTS' end
redis.call('HSET', KEYS[2], '*', '')
for i = 2, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 'OK'
