-- show_marker: keep the room's running-show marker in step with a show's
-- state, after show_state.lua has set it (and read the ticket holders).
--
-- KEYS[1]  the room's running-show marker (the room's slot): `id` = the
--          show, and `u:<user>` = 1 for the model and each ticket holder
-- ARGV[1]  the show's state
-- ARGV[2]  the show's id
-- ARGV[3..] the fields to mark: the model's account (`u:<model>`), then
--          each ticket holder's (show_state.lua's reply)
--
-- Returns 'OK'.
-- Invariant: while the marker names a show, every room event is marked with
-- it (room_event.lua, tip.lua) and only the users in the marker may post;
-- it names a show exactly while that show's state is running. A marker of
-- another show is replaced; one of this show only gains fields, so a ticket
-- that marked itself (ticket.lua, once the marker names its show) stays.
-- shows.py calls show_state and this twice when a show starts, so that a
-- ticket bought between the first read of the holders and the marker's
-- creation is marked by the second. Running twice is harmless.
local current = redis.call('HGET', KEYS[1], 'id')
if ARGV[1] == 'running' then
  if current ~= ARGV[2] then redis.call('DEL', KEYS[1]) end
  local marker = {'id', ARGV[2]}
  for i = 3, #ARGV do
    marker[#marker + 1] = ARGV[i]
    marker[#marker + 1] = 1
  end
  redis.call('HSET', KEYS[1], unpack(marker))
elseif current == ARGV[2] then
  redis.call('DEL', KEYS[1])
end
return 'OK'
