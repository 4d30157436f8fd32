-- menu_cache: write a model's menu into its Redis cache (server/keys.py,
-- Keys.menu), never over a newer one.
--
-- KEYS[1]  the menu hash         KEYS[2]  the epoch key
-- ARGV[1]  'load' (a miss: write only if the cache is absent, so a save that
--          raced the Postgres read wins, and only if Redis is still the one
--          whose epoch the caller saw before reading Postgres, as
--          load_balance.lua does) or 'replace' (a save: write unless the
--          cache holds a newer version, so two racing saves end with the
--          newer one)
-- ARGV[2]  the menu's version (0: a model who never saved a menu)
-- ARGV[3]  'load': the epoch the caller saw; 'replace': unused ('')
-- ARGV[4]  the item ids in order, space-separated
-- ARGV[5..] field, value pairs: `p:<id>` price, `l:<id>` label
--
-- Returns 'OK' when written, 'KEPT' when the cache was left as it was,
-- 'EPOCH' when Redis lost its data since the caller's read (read again).
-- Invariant: the hash is written whole in one call (a tip never sees half a
-- menu), its version never goes down, and a load never brings back a menu
-- older than a save that Redis forgot (a save, then a reset, then a slow
-- load that had read Postgres before the save).
local version = tonumber(ARGV[2])
if ARGV[1] == 'load' then
  if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 'EPOCH' end
  if redis.call('EXISTS', KEYS[1]) == 1 then return 'KEPT' end
else
  local cached = redis.call('HGET', KEYS[1], 'v')
  if cached and tonumber(cached) > version then return 'KEPT' end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'order', ARGV[4], unpack(ARGV, 5))
return 'OK'
