-- show_state: set a ticket show's state in Redis, after Postgres has (the
-- state decides there; this copy is what ticket.lua and the room's chat
-- read), and keep the room's running-show marker in step, atomically.
--
-- KEYS[1]  the show's hash ({eco}, ticket.lua)
-- KEYS[2]  the room's running-show marker (the room's slot): `id` = the
--          show, and `u:<user>` = 1 for the model and each ticket holder; in
--          delivery mode `relay` its {eco} mirror (one slot with KEYS[1]),
--          which Shows then copies onto the room's marker (show_marker.lua)
-- ARGV[1]  the state: scheduled, running, ended or cancelled
-- ARGV[2]  the show's id
-- ARGV[3]  the model's account (`u:<model>`)
--
-- Returns 'OK', or 'NOT_LOADED' when the show's hash is missing (the caller
-- loads it from Postgres and the ledger, and calls again).
-- Invariant: while the marker names a show, every room event is marked with
-- it (room_event.lua, tip.lua) and only the users in the marker may post;
-- it names a show exactly while that show's state here is running. Running
-- twice is harmless: a marker already naming the show is left as it is.
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NOT_LOADED' end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local current = redis.call('HGET', KEYS[2], 'id')
if ARGV[1] == 'running' then
  if current == ARGV[2] then return 'OK' end
  redis.call('DEL', KEYS[2])
  local fields = redis.call('HGETALL', KEYS[1])
  local marker = {'id', ARGV[2], ARGV[3], 1}
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if string.sub(name, 1, 2) == 'u:' and value ~= 'r' then
      marker[#marker + 1] = name
      marker[#marker + 1] = 1
    end
  end
  redis.call('HSET', KEYS[2], unpack(marker))
elseif current == ARGV[2] then
  redis.call('DEL', KEYS[2])
end
return 'OK'
