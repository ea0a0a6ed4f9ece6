-- Count one finished task's usage against its tenant's UTC day, exactly once per task.
-- The marker and the counters share the tenant's slot, so "not counted yet -> count -> mark"
-- is one atomic step: a completion callback delivered twice counts once.
--
-- KEYS[1] the day's usage hash   KEYS[2] the task's "counted" marker
-- ARGV[1] input tokens   ARGV[2] output tokens   ARGV[3] cost
-- ARGV[4] usage ttl (s)  ARGV[5] marker ttl (s)
-- Returns 1 when counted, 0 when the task had been counted before.
-- The marker is set last: Redis does not undo a script's writes when it fails part way, and a
-- marker set before a failed count would make the retry take the task for counted.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local input, output = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('HINCRBY', KEYS[1], 'tokens', input + output)
redis.call('HINCRBY', KEYS[1], 'input_tokens', input)
redis.call('HINCRBY', KEYS[1], 'output_tokens', output)
redis.call('HINCRBY', KEYS[1], 'tasks', 1)
if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'cost', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[5])
return 1
