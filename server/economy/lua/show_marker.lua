-- show_marker: in delivery mode `relay`, the room's running-show marker set
-- from its {eco} mirror (server/economy/shows.py). There show_state.lua
-- writes the show's hash and the mirror (one slot: tips and tickets check
-- the mirror), and this copies the mirror onto the room's marker (the
-- room's slot: chat lines check it, room_event.lua).
--
-- KEYS[1]  the room's running-show marker
-- ARGV[1]  running (the show started, or a sweep restores it), grant (a
--          ticket sold while it runs), or another state (it stopped)
-- ARGV[2]  the show's id
-- ARGV[3..] the mirror's fields and values (HGETALL), for running and grant
--
-- Returns 'OK'.
-- Invariant: the marker names a show only after its mirror did (this runs
-- after show_state.lua), and a grant only adds to the marker of the show it
-- names, so a late grant never brings back a marker its show's end removed.
local current = redis.call('HGET', KEYS[1], 'id')
if ARGV[1] == 'running' then
  if current ~= ARGV[2] then redis.call('DEL', KEYS[1]) end
  if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
elseif ARGV[1] == 'grant' then
  if current == ARGV[2] and #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
elseif current == ARGV[2] then
  redis.call('DEL', KEYS[1])
end
return 'OK'
