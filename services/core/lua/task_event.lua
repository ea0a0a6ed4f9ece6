-- Apply one event to a task and, when it applies, append it to the session log and publish it.
-- Atomic on the session's slot: the state check, the transition, the log append and the
-- publish happen together or not at all, which makes every callback idempotent (duplicates and
-- superseded attempts are refused here) and keeps the log in the order of application.
-- Redis does not undo the writes of a script that fails part way, so the one write that can
-- fail (the XADD: the log key of another type) comes first; after it, only writes to the task
-- hash that HMGET has already read.
--
-- KEYS[1] task state hash    KEYS[2] session log stream
-- KEYS[3] the session's task index (a sorted set: task id -> when its state expires, ms),
--         which an erasure reads instead of scanning the keyspace for the session's tasks
-- KEYS[4] (with persistence) the session's tasks whose history records are on their way (a
--         sorted set, by when they ended): a task that ends joins it in the same step, so a
--         history read never misses a task that has ended (the writer takes it out once its
--         record is written)
-- ARGV[1] op: create | chunk | completed | failed | cancel | requeue | dispatch | timeout
-- ARGV[2] attempt the event answers (0: whatever the current attempt is)
-- ARGV[3] chunk seq (chunk); for dispatch: ms after which a dispatch not confirmed yet (its
--         `dispatched_ms` field still set) is handed out again
-- ARGV[4] frame body without id ("" publishes nothing)
-- ARGV[5] log max length   ARGV[6] log ttl (ms)   ARGV[7] task ttl (s; never shortened)
-- ARGV[8] delivery channel ARGV[9] now (ISO-8601)
-- ARGV[10] prefix of the published message: "" or a W3C traceparent and a newline, so the
--          api can continue the trace on the delivery hop (the log never stores it)
-- ARGV[11] the seq of the task's chunk queued before this event in the same worker batch (0:
--          none): it must have applied first. If it did not (its script failed alone in the
--          pipeline), this event is refused with DEFERRED and retried after it, so a chunk is
--          never skipped by a later one (the seq check would then take it for a duplicate)
-- ARGV[12..] field, value pairs to set on the task
-- Returns {verdict, detail, tier, created_ms, first_chunk[, replay]}: verdict ok (detail: event id or
-- "", or the action for dispatch), exists, unknown, final (detail: the status), stale (detail:
-- the current attempt), duplicate, requeued (a replayed requeue: already done), pending (a
-- dispatch handed out a moment ago and not confirmed yet). tier and
-- created_ms (when the task was accepted) feed the metrics; first_chunk is 1 for the task's
-- first chunk (of its first attempt that streamed: a retry's first chunk is not the first the
-- client saw, and the time to first chunk was observed once per attempt); replay (with final only) is 1 when the event is the one that ended the
-- task (same op, same attempt), delivered again: a redelivery, not a late callback.
local task, log = KEYS[1], KEYS[2]
local op, attempt, seq = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local finals = {completed = true, failed = true, cancelled = true, timed_out = true}
local final_ops = {completed = true, failed = true, cancel = true, timeout = true}
local tier, created_ms, first_chunk = '', '0', 0
local extra = {}  -- the transition's fields, set once the event is in the log

local function mark_unwritten()
  if KEYS[4] and final_ops[op] then
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    redis.call('ZADD', KEYS[4], now_ms, string.match(task, ':task:(.*)$'))
    redis.call('EXPIRE', KEYS[4], 3600)
  end
end

-- How long the index outlives its last task's state, and how long past its score a member
-- waits before a creation looks whether its state is gone.
local INDEX_SLACK_MS = 86400000

-- Score the task by when its state now expires, and keep the index at least that long (plus
-- the slack): called when a task is created, and whenever an event lengthens its state (a
-- process with a longer TASK_TTL_SECONDS, an event past the deadline), so no state outlives
-- its member or the index. GT: a member is never moved earlier.
local function index_task(now_ms, ttl_ms)
  if not KEYS[3] then return end
  redis.call('ZADD', KEYS[3], 'GT', now_ms + ttl_ms, string.match(task, ':task:(.*)$'))
  if redis.call('PTTL', KEYS[3]) < ttl_ms + INDEX_SLACK_MS then
    redis.call('PEXPIRE', KEYS[3], ttl_ms + INDEX_SLACK_MS)
  end
end

-- At a creation, forget up to 100 members a day past their score whose state is gone (a
-- state still there is scored again by its real expiry): a session with a task a minute for
-- a year does not keep half a million members.
local function prune_index(now_ms)
  local prefix = string.match(task, '^(.*:task:)')
  local stale = redis.call(
    'ZRANGEBYSCORE', KEYS[3], '-inf', now_ms - INDEX_SLACK_MS, 'LIMIT', 0, 100)
  for _, member in ipairs(stale) do
    local left = redis.call('PTTL', prefix .. member)
    if left == -2 then
      redis.call('ZREM', KEYS[3], member)
    else
      if left < 0 then left = INDEX_SLACK_MS end  -- no expiry: look again a day from now
      redis.call('ZADD', KEYS[3], now_ms + left, member)
    end
  end
end

local function index_created()
  if op ~= 'create' or not KEYS[3] then return end
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  index_task(now_ms, tonumber(ARGV[7]) * 1000)
  prune_index(now_ms)
end

local function set_fields(extra)
  local fields = {'updated_at', ARGV[9]}
  for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
  for _, v in ipairs(extra) do fields[#fields + 1] = v end
  redis.call('HSET', task, unpack(fields))
  -- Only ever lengthened: a task is created to live past its deadline (its tier's timeout
  -- plus TASK_TTL_SECONDS), and a later event must not cut that to TASK_TTL_SECONDS.
  if redis.call('TTL', task) < tonumber(ARGV[7]) then
    redis.call('EXPIRE', task, ARGV[7])
    if op ~= 'create' then
      local now = redis.call('TIME')
      index_task(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000),
        tonumber(ARGV[7]) * 1000)
    end
  end
end

if op == 'create' then
  if redis.call('EXISTS', task) == 1 then
    return {'exists', redis.call('HGET', task, 'status')}
  end
  extra = {'created_at', ARGV[9], 'attempt', '1', 'last_seq', '0'}
else
  local state = redis.call(
    'HMGET', task, 'status', 'attempt', 'last_seq', 'tier', 'created_ms', 'ended_by', 'stream',
    'first_chunk_at')
  local status = state[1]
  tier, created_ms = state[4] or '', state[5] or '0'
  if not status then return {'unknown', ''} end
  if finals[status] then
    -- replay: 1 when this is the event that ended the task, delivered again (not late)
    local replay = state[6] == op .. ':' .. ARGV[2] and 1 or 0
    return {'final', status, tier, created_ms, 0, replay}
  end
  local current = tonumber(state[2])
  if op == 'requeue' and status == 'queued' and attempt + 1 == current then
    return {'requeued', state[2]}
  end
  if attempt ~= 0 and attempt ~= current then return {'stale', state[2]} end
  if tonumber(state[3]) < tonumber(ARGV[11]) then
    return redis.error_reply('DEFERRED the previous chunk of the task did not apply')
  end
  if op == 'chunk' then
    if seq <= tonumber(state[3]) then return {'duplicate', state[3]} end
    if state[7] == '0' then
      -- The client asked for one answer, not a stream (or its tier streams nothing): an AES
      -- that streams anyway has its chunk taken in order, and nothing is sent; the
      -- completion carries the whole answer.
      set_fields({'last_seq', ARGV[3]})
      return {'ok', '', tier, created_ms, 0}
    end
    extra = {'last_seq', ARGV[3], 'status', 'streaming'}
    if not state[8] then
      extra[#extra + 1] = 'first_chunk_at'
      extra[#extra + 1] = ARGV[9]
      first_chunk = 1
    end
  elseif op == 'requeue' then
    extra = {'attempt', tostring(current + 1), 'last_seq', '0', 'status', 'queued'}
  elseif op == 'dispatch' then
    -- Handed out with a mark the dispatcher removes once the attempt's action is on the AES
    -- stream: a dispatcher that failed in between (a lost connection, a crash) leaves the
    -- mark, and the attempt is handed out again once the mark is old enough not to be one
    -- still on its way. Without it the retry was lost: the task no longer `queued`.
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    if status == 'queued' then
      set_fields({'status', 'processing', 'dispatched_ms', tostring(now_ms)})
      return {'ok', redis.call('HGET', task, 'action') or ''}
    end
    local mark = tonumber(redis.call('HGET', task, 'dispatched_ms') or '')
    if status ~= 'processing' or not mark then return {'stale', state[2]} end
    if now_ms - mark < seq then return {'pending', state[2]} end
    redis.call('HSET', task, 'dispatched_ms', tostring(now_ms))
    return {'ok', redis.call('HGET', task, 'action') or ''}
  end
end

if ARGV[4] == '' then
  if final_ops[op] then
    extra[#extra + 1] = 'ended_by'
    extra[#extra + 1] = op .. ':' .. ARGV[2]
  end
  set_fields(extra)
  mark_unwritten()
  index_created()
  return {'ok', '', tier, created_ms, first_chunk}
end
local id = redis.call('XADD', log, 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
redis.call('PEXPIRE', log, ARGV[6])
redis.call('SPUBLISH', ARGV[8], ARGV[10] .. '{"id":"' .. id .. '",' .. ARGV[4])
if final_ops[op] then
  -- The history cursor: the id of the event that ended the task (see services/persistence).
  extra[#extra + 1] = 'final_event_id'
  extra[#extra + 1] = id
  extra[#extra + 1] = 'ended_by'
  extra[#extra + 1] = op .. ':' .. ARGV[2]
end
set_fields(extra)
mark_unwritten()
index_created()
return {'ok', id, tier, created_ms, first_chunk}
