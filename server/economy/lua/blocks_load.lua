-- blocks_load: put a user's blocks (from Postgres) into Redis, unless they
-- changed since the caller read Postgres.
--
-- KEYS[1] the user's blocks set    KEYS[2] the user's blocks generation
-- ARGV[1] the generation the caller saw before reading Postgres ('' for none)
-- ARGV[2..] the blocked user ids
--
-- Returns 'OK' (loaded), 'EXISTS' (loaded already: nothing written) or
-- 'STALE' (a block or an unblock committed meanwhile: read Postgres again).
-- Invariant: a change commits in Postgres, then bumps the generation and
-- drops the set (server/catalog/dms.py); a load that read Postgres before
-- the change saw the older generation and writes nothing, so the set never
-- misses a committed block. The member `*` (never a user id) marks the set
-- loaded when the user blocks nobody (Redis has no empty sets).
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 'STALE' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'EXISTS' end
redis.call('SADD', KEYS[1], '*')
for i = 2, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
end
return 'OK'
