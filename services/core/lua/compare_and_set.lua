-- Replace a key's value only while it still holds the value the caller read: a GET and a SET
-- (or DEL) from the client can interleave with another client's, and two requests that both
-- read an Idempotency-Key naming an abandoned task would both take it over.
--
-- KEYS[1] the key   ARGV[1] the value read   ARGV[2] the new value, or '' to delete the key
-- ARGV[3] ttl (s) of the new value
-- Returns 1 if the key was replaced (or deleted), 0 if it holds something else or nothing.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
