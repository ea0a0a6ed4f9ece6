-- Count a tenant's open sockets across every pod; entries expire unless refreshed, so a pod
-- that dies without closing its sockets stops counting against the tenant after the TTL.
-- KEYS[1] the tenant's socket set (score: expiry in ms of the server clock)
-- ARGV[1] op: acquire | refresh | release   ARGV[2] ttl (ms)   ARGV[3] limit (acquire)
-- ARGV[4..] socket ids
-- Returns {admitted (1/0), live sockets}
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local key, op, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
if op == 'release' then
  for i = 4, #ARGV do redis.call('ZREM', key, ARGV[i]) end
  return {1, redis.call('ZCARD', key)}
end
if op == 'acquire' then
  local live = redis.call('ZCARD', key)
  if live >= tonumber(ARGV[3]) then return {0, live} end
  redis.call('ZADD', key, now_ms + ttl, ARGV[4])
else
  -- Not XX: a socket still open whose member expired (Redis away for longer than the ttl)
  -- or vanished (Redis restarted without its data) counts again. (A refresh that crosses
  -- its socket's release can leave the member counted until it expires: one ttl at most.)
  for i = 4, #ARGV do redis.call('ZADD', key, now_ms + ttl, ARGV[i]) end
end
-- The set lives as long as its last member, whatever ttl this caller has (the operator's
-- count may run with a shorter one than the apis' refreshes).
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', key, tonumber(last[2]) + 1) end
return {1, redis.call('ZCARD', key)}
