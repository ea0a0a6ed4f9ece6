-- GCRA (generic cell rate algorithm) on one key: the key holds the "theoretical arrival time"
-- (TAT) in microseconds; a request of `cost` moves it `cost` emission intervals forward and is
-- allowed when the new TAT is at most `tolerance` ahead of now. Read, decide and write happen in
-- this one script, so any number of api processes share one limit without races.
--
-- KEYS[1] limiter key
-- ARGV[1] emission interval (us)   ARGV[2] burst tolerance (us) = interval * limit
-- ARGV[3] cost (0: only look; negative: give back what an earlier call took)
-- ARGV[4] now (us); "" takes the server's clock (TIME), so every caller agrees on time.
--         Only tests pass a value, to drive time deterministically.
-- KEYS[2] optional: the tenant's usage hash of the UTC day, to check the token budget in the same
--         step (both keys on the tenant's slot). An allowed request is then checked against the
--         budget and, when within it and cost > 0, counted (HINCRBY requests, as usage_admit.lua);
--         a refund (cost < 0) also takes the count back. A refused request touches no budget.
-- ARGV[5] tokens per day (0: unlimited)   ARGV[6] usage ttl (s)   (with KEYS[2] only)
-- Returns {allowed 1|0, remaining, reset_after (us), retry_after (us)}, and with KEYS[2] when
-- allowed a fifth element: 1 within the budget, 0 over it (the rate limit still counted it, as
-- a separate budget check after the limit would).
local interval, tolerance, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local stored = redis.call('GET', KEYS[1])
local tat = stored and tonumber(stored) or now
if tat < now then tat = now end

local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at > now then
  local remaining = math.max(0, math.floor((tolerance - (tat - now)) / interval))
  return {0, remaining, tat - now, allow_at - now}
end

if cost ~= 0 then
  if new_tat > now then
    -- The key lives exactly as long as it holds information: once now passes the TAT the
    -- limit is full again, which is what a missing key means.
    local ttl_ms = math.ceil((new_tat - now) / 1000)
    redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
  else
    redis.call('DEL', KEYS[1])
  end
end
if new_tat < now then new_tat = now end
local remaining = math.floor((tolerance - (new_tat - now)) / interval)
if not KEYS[2] then return {1, remaining, new_tat - now, 0} end

local within = 1
if cost < 0 then
  redis.call('HINCRBY', KEYS[2], 'requests', -1)
else
  local used = tonumber(redis.call('HGET', KEYS[2], 'tokens') or '0')
  local budget = tonumber(ARGV[5])
  if budget > 0 and used >= budget then
    within = 0
  elseif cost > 0 then
    redis.call('HINCRBY', KEYS[2], 'requests', 1)
    redis.call('EXPIRE', KEYS[2], ARGV[6])
  end
end
return {1, remaining, new_tat - now, 0, within}
