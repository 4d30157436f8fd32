-- lease: take or renew a lease that one process at a time holds (the
-- deadline sweeper's), or give it up.
--
-- KEYS[1]  the lease key
-- ARGV[1]  this holder's token (random per process)
-- ARGV[2]  lifetime in milliseconds; 0 gives the lease up
--
-- Returns 1 when the caller holds the lease after the call, else 0.
-- Invariant: only the holder renews or deletes it (compare then act, which
-- needs one atomic call); anyone takes it once it has expired (SET NX PX).
local holder = redis.call('GET', KEYS[1])
local ttl_ms = tonumber(ARGV[2])
if ttl_ms == 0 then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl_ms)
return 1
