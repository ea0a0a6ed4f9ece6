-- Remove a fired timer, unless it was set again meanwhile for later.
-- A retry is fired (its attempt handed out) and then removed; in between, the attempt can
-- fail fast and its requeue schedule the next retry under the same member: a plain ZREM
-- would remove that one, and the task would wait for its deadline.
--
-- KEYS[1] the timers' sorted set   ARGV[1] member   ARGV[2] the moment it was fired at
-- Returns 1 when removed.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
