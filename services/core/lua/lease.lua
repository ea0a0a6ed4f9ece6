-- Renew (ARGV[3] == 'renew') or release (ARGV[3] == 'release') a lease we hold.
-- KEYS[1] lease key   KEYS[2] (release) its released mark   ARGV[1] holder id   ARGV[2] ttl (ms)
-- Returns 1 when we held it, 0 when someone else (or no one) does.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'release' then
  redis.call('DEL', KEYS[1])
  -- The holder stopped its consumer before releasing: the next holder need not wait for a
  -- batch it may still be finishing (the takeover grace, for a lease that expired).
  if KEYS[2] then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
