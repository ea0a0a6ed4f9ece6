-- Up to ARGV[3] new entries of the priority streams KEYS (highest first) for consumer ARGV[2]
-- of group ARGV[1], taken from the first stream before the next is read: a multi-stream
-- XREADGROUP takes COUNT entries from *each* stream, so a reader with one free slot got one
-- high, one normal and one low entry, and held the two it could not run (the low one then ran
-- before the high ones still queued, and no idle peer could take either). Reply: XREADGROUP's
-- shape, {{stream, entries}, ...}, without the streams that had nothing.
local left = tonumber(ARGV[3])
local out = {}
for _, stream in ipairs(KEYS) do
    if left <= 0 then
        break
    end
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
        'STREAMS', stream, '>')
    if reply then
        local entries = reply[1][2]
        left = left - #entries
        out[#out + 1] = reply[1]
    end
end
return out
