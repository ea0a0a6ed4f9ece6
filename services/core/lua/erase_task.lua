-- Erase one task of an erased session. KEYS[1]: its state hash. KEYS[2]: the session's task
-- index, which forgets a task once nothing of it is left (a stub kept stays in it: a retried
-- erasure must find it).
-- A final task's state is deleted. A running one is ended as cancelled and kept, without its
-- message or answer, until it expires: a completion crossing the erasure then finds a final
-- task and its usage is counted once, as for one crossing a cancel. (Deleted, it found no
-- task, and erasing the session at the last chunk dodged the token budget.)
-- Returns {0}: nothing there; {1}: it was final; {2, ttl, field, value, ...}: it was running,
-- with its stub's ttl and its state as it was (for its record: the request counts in the
-- tenant's usage); {3, ttl, field, value, ...}: kept by an earlier erasure that did not say it
-- had told everyone (`told`), with the stub's ttl and fields; {4}: kept and told.
local task = KEYS[1]
local state = redis.call('HGETALL', task)
local function forget()
  if KEYS[2] then redis.call('ZREM', KEYS[2], string.match(task, ':task:(.*)$')) end
end
if #state == 0 then
  forget()
  return {0}
end
local fields = {}
for i = 1, #state, 2 do fields[state[i]] = state[i + 1] end
if not fields.status then
  -- Not a task's state (a stray field written after it expired): nothing of a task to keep.
  redis.call('DEL', task)
  forget()
  return {0}
end
if fields.ended_by == 'erase:0' then
  -- What an earlier erasure kept: kept again (deleted, the budget dodge is back), not counted
  -- (a second DELETE of the session answers 404: nothing was left to erase). Its fields go
  -- back: that erasure may have failed before queueing the task's record or notices. Once it
  -- said it had not, nothing is sent again: a client repeating the DELETE filled the
  -- `{aes}:cancel` stream every tenant shares with the task's notice.
  if fields.told == '1' then return {4} end
  local reply = {3, redis.call('TTL', task)}
  for i = 1, #state do reply[#reply + 1] = state[i] end
  return reply
end
local finals = {completed = true, failed = true, cancelled = true, timed_out = true}
if finals[fields.status] then
  redis.call('DEL', task)
  forget()
  return {1}
end
local ttl = redis.call('TTL', task)
redis.call('DEL', task)
-- What task_event.lua reads of a final task (the status, the metrics' tier and start).
-- (Plus what its usage record needs, none of it the conversation: agent, user, start.)
redis.call('HSET', task, 'status', 'cancelled', 'ended_by', 'erase:0',
  'attempt', fields.attempt or '1', 'last_seq', fields.last_seq or '0',
  'tier', fields.tier or '', 'created_ms', fields.created_ms or '0',
  'stream', fields.stream or '1', 'updated_at', ARGV[1],
  'agent_id', fields.agent_id or '', 'user_id', fields.user_id or '',
  'created_at', fields.created_at or '')
if ttl > 0 then redis.call('EXPIRE', task, ttl) end
local reply = {2, ttl}
for i = 1, #state do reply[#reply + 1] = state[i] end
return reply
