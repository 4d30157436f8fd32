-- hello_read: what a batch of hellos reads once its users' channels are
-- subscribed, in one call: per user, her balance, her limits' version and
-- reality-check period, her counters' total and the DMs stored since her
-- inbox cursor. One call instead of a round trip of each kind per hello
-- (or four pipelines of a command per user each, whose packing and parsing
-- cost the gateway more than the reads cost Redis).
--
-- KEYS, five per user, in this order: her balance, her limits hash, her
--      counters hash, her DM inbox stream, her inbox cursor (all in the
--      money slot)
-- ARGV[1] DMs read per inbox at most (Settings.inbox_len)
--
-- Returns one list per user: { balance, limits version, reality-check
-- minutes, counters total, { {offset, event}, ... }, inbox cursor }, each
-- of the first four and the cursor false (nil) when absent.
-- Invariant: it writes nothing. What it finds missing the caller loads
-- through the fenced load scripts (load_balance, limits_load), which keep
-- the Redis-older-than-ledger checks; a retry of this call is harmless.
local count = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 5 do
  local limits = redis.call('HMGET', KEYS[i + 1], 'v', 'rc')
  local cursor = redis.call('GET', KEYS[i + 4])
  local start = '-'
  if cursor then start = '(' .. cursor end
  local dms = {}
  for _, entry in ipairs(redis.call('XRANGE', KEYS[i + 3], start, '+', 'COUNT', count)) do
    local fields = entry[2]
    for f = 1, #fields, 2 do
      if fields[f] == 'e' then dms[#dms + 1] = {entry[1], fields[f + 1]} end
    end
  end
  out[#out + 1] = {
    redis.call('GET', KEYS[i]), limits[1], limits[2], redis.call('HGET', KEYS[i + 2], 't'), dms,
    cursor
  }
end
return out
