-- Remove the entries of a stream that every consumer group has read and acknowledged, so that
-- consumed entries (each carrying a message's text) do not stay in memory until MAXLEN.
-- The trim point is the minimum over the groups of (the group's smallest pending id, else the
-- id just after its last delivered one): no group loses an entry it has not read or still
-- holds pending, whoever its consumers are (an external AES has its own group). A stream
-- without groups is left alone (its MAXLEN bounds it). Trimming by MINID removes only the
-- head and does not move max-deleted-entry-id, so XINFO GROUPS `lag` stays exact.
-- Atomic: no group can read or acknowledge between the look at the groups and the trim.
-- KEYS[1] stream
-- ARGV[1] most entries to remove in this call (XTRIM ~ LIMIT: bounded work per call)
-- Returns how many entries were removed (0 when the stream or its groups do not exist).
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then
  return 0
end

-- Ids are `ms-seq` of decimal digits without leading zeros, up to 2^64-1 each: beyond a Lua
-- number's exact range, so they are compared and incremented as strings.
local MAX_SEQ = '18446744073709551615'

local function less_digits(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local function less(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms ~= b_ms then
    return less_digits(a_ms, b_ms)
  end
  return less_digits(a_seq, b_seq)
end

local function increment(digits)
  local i = #digits
  while i > 0 and string.sub(digits, i, i) == '9' do
    i = i - 1
  end
  if i == 0 then
    return '1' .. string.rep('0', #digits)
  end
  return string.sub(digits, 1, i - 1) .. string.char(string.byte(digits, i) + 1)
    .. string.rep('0', #digits - i)
end

local function after(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if seq == MAX_SEQ then
    return increment(ms) .. '-0'
  end
  return ms .. '-' .. increment(seq)
end

local point = nil
for _, group in ipairs(groups) do
  local field = {}
  for i = 1, #group, 2 do
    field[group[i]] = group[i + 1]
  end
  local safe = after(field['last-delivered-id'])
  if field['pending'] > 0 then
    -- Pending ids are normally at or before the last delivered one, but XGROUP SETID can
    -- move the group's position back below them: the smaller of both is kept.
    local smallest = redis.call('XPENDING', KEYS[1], field['name'])[2]
    if smallest and less(smallest, safe) then
      safe = smallest
    end
  end
  if point == nil or less(safe, point) then
    point = safe
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', point, 'LIMIT', ARGV[1])
