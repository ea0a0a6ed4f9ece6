-- Append an event that belongs to no task (the AES's websocket.send) to the session log and
-- publish it, once. A session's own callbacks are in one partition stream, but a send to it
-- may come from any stream (an AES answering a task of another session on that session's
-- `callback_queue`), each applied in its own order: so the session keeps one mark per stream
-- (the id of the last entry applied from it) in one hash, and a redelivered entry (at or
-- below its stream's mark) does nothing.
--
-- KEYS[1] the session's applied marks (hash: stream -> entry id)   KEYS[2] session log stream
-- ARGV[1] frame body without id   ARGV[2] log max length   ARGV[3] log ttl (ms)
-- ARGV[4] delivery channel        ARGV[5] marks ttl (s)
-- ARGV[6] the callback's entry id in its partition stream
-- ARGV[7] the entry id of the session's previous websocket.send from that stream in the same
--         worker batch, or '' (it must have applied first: if it did not, this one is refused
--         with DEFERRED and retried after it, so a session's events never overtake or skip
--         each other)
-- ARGV[8] the callback's partition stream
-- ARGV[9] optional: a W3C traceparent and a newline, prefixed to the published message only
--         (as task_event.lua's ARGV[10]) so the api pods continue the trace of a traced send;
--         the log never stores it. Absent for an untraced send.
-- Returns {'ok', log id} or {'duplicate', ''}.
--
-- Without ARGV[6] (a caller that has no stream entry, such as `bench --direct`), KEYS[1] is a
-- key of its own for the action, set for ARGV[5] seconds: the event applies once per key.
-- The mark is written after the XADD, the one write that can fail (the log key of another
-- type): Redis does not undo a script's writes when it fails part way, and a mark written
-- before a failed append would make the retry a "duplicate" (the event lost).
if ARGV[6] == nil then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return {'duplicate', ''}
  end
else
  -- Stream ids are 'ms-seq'; compared as numbers (a Lua number holds 2^53 exactly).
  local function after(a, b)
    local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
    local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
    ams, bms = tonumber(ams), tonumber(bms)
    if ams ~= bms then return ams > bms end
    return tonumber(aseq) > tonumber(bseq)
  end
  local mark = redis.call('HGET', KEYS[1], ARGV[8])
  if ARGV[7] ~= '' and (not mark or after(ARGV[7], mark)) then
    return redis.error_reply('DEFERRED the previous event of the session did not apply')
  end
  if mark and not after(ARGV[6], mark) then
    return {'duplicate', ''}
  end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[9] then
  redis.call('SPUBLISH', ARGV[4], ARGV[9] .. '{"id":"' .. id .. '",' .. ARGV[1])
else
  redis.call('SPUBLISH', ARGV[4], '{"id":"' .. id .. '",' .. ARGV[1])
end
if ARGV[6] == nil then
  redis.call('SET', KEYS[1], '1', 'EX', ARGV[5])
else
  redis.call('HSET', KEYS[1], ARGV[8], ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return {'ok', id}
