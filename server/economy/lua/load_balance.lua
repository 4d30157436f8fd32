-- load_balance: put an account's balance from Postgres into Redis, with the
-- idempotency records of its recent spends, unless Redis lost its data (or
-- someone else loaded it) since the caller read Postgres.
--
-- KEYS[1] the epoch key          KEYS[2] the account's balance
-- KEYS[3..] idempotency keys to restore (one per recent spend)
-- ARGV[1] the epoch the caller saw before reading Postgres
-- ARGV[2] the balance read from Postgres
-- ARGV[3..] for each KEYS[3..]: the record, then its remaining lifetime (s)
--
-- Returns 'OK' (loaded), 'EXISTS' (already loaded: nothing written) or
-- 'EPOCH' (Redis was reset meanwhile: read Postgres again).
-- Invariant (the fence): a balance is set only if absent, and only if Redis
-- is still the one whose epoch the caller saw, so a slow load can neither
-- overwrite a balance that spends have moved since nor bring back a stale one
-- after Redis lost its data.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'EPOCH' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'EXISTS' end
redis.call('SET', KEYS[2], ARGV[2])
for i = 3, #KEYS do
  local record = ARGV[(i - 3) * 2 + 3]
  local ttl = tonumber(ARGV[(i - 3) * 2 + 4])
  if ttl > 0 then redis.call('SET', KEYS[i], record, 'EX', ttl, 'NX') end
end
return 'OK'
