-- clear: remove one user's lines from a room's history.
--
-- KEYS[1]  the room's history stream
-- ARGV[1]  the user whose events go
-- ARGV[2]  what goes: 'chat' (a moderator's clear; absent means 'chat'):
--          that user's `message` events; 'all' (her account deleted,
--          DELETE /v1/me): every event that names her, i.e. hers (`from`:
--          chat, tips, item tips, media) and `king` events crowning her
--
-- Returns how many events were removed.
--
-- Invariant: after it, no `join` returns a removed event posted before the
-- clear (the stream is the only history; it holds at most history_len
-- events, so the scan is bounded). With 'chat', tips stay: they are
-- payments, and the ledger names them anyway. With 'all', they go too: the
-- ledger keeps them, under her pseudonym (docs/economy.md, "Deleted
-- accounts"), and a history entry cannot be rewritten in place (a stream
-- only appends). Retry-safe: a second run removes nothing.
local everything = ARGV[2] == 'all'
local removed = 0
local rows = redis.call('XRANGE', KEYS[1], '-', '+')
for _, row in ipairs(rows) do
  local fields = row[2]
  for i = 1, #fields, 2 do
    -- An event that does not contain the user's id as plain text cannot
    -- name her (ids need no JSON escaping): only the others are decoded, so
    -- a history of thousands of events is scanned in milliseconds.
    if fields[i] == 'e' and string.find(fields[i + 1], ARGV[1], 1, true) then
      local ok, event = pcall(cjson.decode, fields[i + 1])
      if ok and type(event) == 'table' then
        local hit
        if everything then
          local king = event['king']
          hit = event['from'] == ARGV[1]
            or (event['type'] == 'king' and type(king) == 'table' and king['user'] == ARGV[1])
        else
          hit = event['type'] == 'message' and event['from'] == ARGV[1]
        end
        if hit then
          removed = removed + redis.call('XDEL', KEYS[1], row[1])
        end
      end
    end
  end
end
return removed
