-- clear: remove one user's chat lines from a room's history.
--
-- KEYS[1]  the room's history stream
-- ARGV[1]  the user whose `message` events go
--
-- Returns how many events were removed.
--
-- Invariant: after it, no `join` returns a chat line of that user's posted
-- before the clear (the stream is the only history; it holds at most
-- history_len events, so the scan is bounded). Tips stay: they are payments,
-- and the ledger names them anyway. Retry-safe: a second run removes nothing.
local removed = 0
local rows = redis.call('XRANGE', KEYS[1], '-', '+')
for _, row in ipairs(rows) do
  local fields = row[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then
      local ok, event = pcall(cjson.decode, fields[i + 1])
      if ok and type(event) == 'table' and event['type'] == 'message'
          and event['from'] == ARGV[1] then
        removed = removed + redis.call('XDEL', KEYS[1], row[1])
      end
    end
  end
end
return removed
