-- Delete the consumers of a group that hold no pending entry (XGROUP DELCONSUMER), so the
-- group does not keep one consumer per process that ever read it (every pod of every rollout).
-- Atomic: no entry can be delivered to a consumer between the check and its deletion. A live
-- consumer deleted by mistake costs nothing: its next read makes it again.
-- KEYS[1] stream
-- ARGV[1] group; ARGV[2] least idle time in ms; ARGV[3] a consumer to keep ('' for none);
-- ARGV[4] the only consumer to consider ('' for every one).
-- Returns how many consumers were deleted (0 when the stream or the group does not exist).
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  return 0
end
local idle_min = tonumber(ARGV[2])
local deleted = 0
for _, consumer in ipairs(consumers) do
  local field = {}
  for i = 1, #consumer, 2 do
    field[consumer[i]] = consumer[i + 1]
  end
  local name = field['name']
  if field['pending'] == 0 and field['idle'] >= idle_min and name ~= ARGV[3]
      and (ARGV[4] == '' or name == ARGV[4]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    deleted = deleted + 1
  end
end
return deleted
