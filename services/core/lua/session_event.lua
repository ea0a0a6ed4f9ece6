-- Append an event that belongs to no task (the AES's websocket.send) to the session log and
-- publish it, once per action id: a redelivered action finds its dedupe key and does nothing.
--
-- KEYS[1] dedupe key   KEYS[2] session log stream
-- ARGV[1] frame body without id   ARGV[2] log max length   ARGV[3] log ttl (ms)
-- ARGV[4] delivery channel        ARGV[5] dedupe ttl (s)
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[5]) then
  return {'duplicate', ''}
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SPUBLISH', ARGV[4], '{"id":"' .. id .. '",' .. ARGV[1])
return {'ok', id}
