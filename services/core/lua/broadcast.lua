-- Publish a tenant-wide message once (a redelivered action publishes nothing). A tenant's
-- broadcasts may come from any partition stream, each applied in its own order, so the tenant
-- keeps one mark per stream (the id of the last entry applied from it) in one hash.
--
-- KEYS[1] the tenant's applied marks (hash: stream -> entry id)
-- ARGV[1] frame body without id   ARGV[2] channel   ARGV[3] marks ttl (s)
-- ARGV[4] the callback's partition stream   ARGV[5] its entry id there
-- ARGV[6] the entry id of the tenant's previous broadcast from that stream in the same worker
--         batch, or '' (refused with DEFERRED unless that one applied: see session_event.lua)
-- Returns {'ok', ''} or {'duplicate', ''}.
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams > bms end
  return tonumber(aseq) > tonumber(bseq)
end
local mark = redis.call('HGET', KEYS[1], ARGV[4])
if ARGV[6] ~= '' and (not mark or after(ARGV[6], mark)) then
  return redis.error_reply('DEFERRED the previous broadcast of the tenant did not apply')
end
if mark and not after(ARGV[5], mark) then
  return {'duplicate', ''}
end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SPUBLISH', ARGV[2], ARGV[1])
return {'ok', ''}
