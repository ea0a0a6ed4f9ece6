-- A chat send on one server, in one step: the session's rate limit, the tenant's (with its
-- token budget), then, only when both allow and the budget has room, the task state and its
-- first event, where the task lives, its deadline and the action for the AES.
--
-- Composed when loaded (services/core/scripts.py): `rate_limit` is ratelimit.lua and
-- `task_event` is task_event.lua, each wrapped as a local function of (KEYS, ARGV), so every
-- rule stays in one file. On Redis Cluster these keys are in different slots and the api runs
-- the same steps in two round trips (RateLimiter.check_many, then the task pipeline); the
-- outcome is the same, including the refunds below.
--
-- KEYS[1] session limiter   KEYS[2] tenant limiter   KEYS[3] tenant usage of the day
-- KEYS[4] task state        KEYS[5] session log      KEYS[6] the session's task index
-- KEYS[7] task location     KEYS[8] partition deadlines
-- KEYS[9] AES stream of the priority
-- ARGV[1], ARGV[2], ARGV[3]: how many of the next arguments are the session limiter's, the
--   tenant limiter's (ratelimit.lua's, with the budget's) and the task script's (create)
-- then: location value, location ttl (s), deadline member, deadline score, stream max length,
--   action field, action
-- Returns {session limit reply, tenant limit reply, task reply}; the task reply is 0 when the
-- limits or the budget refused (nothing was created); both limit replies are 0 when the task
-- already existed (a retried call).
-- A send whose connection was lost after this script ran is sent again by the client's retry
-- with the same task id: it finds its task and takes nothing from the limits twice.
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {0, 0, {'exists', redis.call('HGET', KEYS[4], 'status') or ''}}
end

local counts = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
local parts, next_arg = {}, 4
for n, count in ipairs(counts) do
  local part = {}
  for i = 1, count do part[i] = ARGV[next_arg + i - 1] end
  parts[n] = part
  next_arg = next_arg + count
end
local session_args, tenant_args, task_args = parts[1], parts[2], parts[3]

local session = rate_limit({KEYS[1]}, session_args)
local tenant = rate_limit({KEYS[2], KEYS[3]}, tenant_args)
if session[1] == 0 or tenant[1] == 0 then
  -- All or none, as RateLimiter.check_many: the limit that allowed gives back what it took
  -- (and the tenant's the request it counted, when it counted one).
  if session[1] == 1 then
    session_args[3] = tostring(-tonumber(session_args[3]))
    rate_limit({KEYS[1]}, session_args)
  elseif tenant[1] == 1 then
    tenant_args[3] = tostring(-tonumber(tenant_args[3]))
    if tenant[5] == 1 then
      rate_limit({KEYS[2], KEYS[3]}, tenant_args)
    else
      rate_limit({KEYS[2]}, tenant_args)
    end
  end
  return {session, tenant, 0}
end
-- Over the budget: the limits keep what they took, as when the budget is checked after them.
if tenant[5] == 0 then return {session, tenant, 0} end

local created = task_event({KEYS[4], KEYS[5], KEYS[6]}, task_args)
if created[1] == 'ok' then
  local a = next_arg
  redis.call('SET', KEYS[7], ARGV[a], 'EX', ARGV[a + 1])
  redis.call('ZADD', KEYS[8], ARGV[a + 3], ARGV[a + 2])
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[a + 4], '*', ARGV[a + 5], ARGV[a + 6])
end
return {session, tenant, created}
