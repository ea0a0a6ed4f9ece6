-- Publish a tenant-wide message once per action id (a redelivered action publishes nothing).
-- KEYS[1] dedupe key   ARGV[1] frame body without id   ARGV[2] channel   ARGV[3] dedupe ttl (s)
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  return {'duplicate', ''}
end
redis.call('SPUBLISH', ARGV[2], ARGV[1])
return {'ok', ''}
