-- Admit one request against its tenant's token budget for the UTC day, and count it.
-- Reading the budget and counting the request in one script saves the send path a round trip;
-- a refused request is not counted.
--
-- KEYS[1] the day's usage hash
-- ARGV[1] tokens per day (0: unlimited)   ARGV[2] usage ttl (s)
-- Returns {admitted 1|0, tokens used today}.
local used = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local budget = tonumber(ARGV[1])
if budget > 0 and used >= budget then return {0, used} end
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, used}
