-- dm_forget: a deleted account's DMs out of the Redis copies that would
-- still deliver or archive them (DELETE /v1/me; server/catalog/dms.py), and
-- the other events queued in inboxes that name her: a custom request's
-- (`from` the fan, `to` the model) and a private show's (`fan`, `model`).
--
-- KEYS[1]     the DM archive stream (dm.lua's KEY.dm_log)
-- KEYS[2..n]  inbox streams of users she may have written to or dealt with
-- ARGV[1]     the deleted user
--
-- Returns {removed, recipients...}: how many entries went, and the
-- recipients her archive-stream entries named (the caller adds their inboxes
-- to its next call: a script only touches the keys it declares).
--
-- Invariant: after it (her sessions are closed first, so she writes no more)
-- no hello replays a DM of hers from an inbox, and the archiver copies none
-- of hers into Postgres from here on (one it read already is removed from
-- the table by the caller afterwards). Bounded: the archive stream holds at
-- most dm_log_max entries, an inbox inbox_len. Retry-safe: a second run
-- removes nothing.
local user = ARGV[1]
local removed = 0
local recipients = {}
local named = {}

local function hers(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then
      local ok, event = pcall(cjson.decode, fields[i + 1])
      return ok and type(event) == 'table' and (event['from'] == user or event['to'] == user
        or event['fan'] == user or event['model'] == user)
    end
  end
  return false
end

for _, row in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  if hers(row[2]) then
    for i = 1, #row[2], 2 do
      if row[2][i] == 'to' and not named[row[2][i + 1]] then
        named[row[2][i + 1]] = true
        recipients[#recipients + 1] = row[2][i + 1]
      end
    end
    removed = removed + redis.call('XDEL', KEYS[1], row[1])
  end
end
for k = 2, #KEYS do
  for _, row in ipairs(redis.call('XRANGE', KEYS[k], '-', '+')) do
    if hers(row[2]) then
      removed = removed + redis.call('XDEL', KEYS[k], row[1])
    end
  end
end
local reply = {removed}
for _, recipient in ipairs(recipients) do
  reply[#reply + 1] = recipient
end
return reply
