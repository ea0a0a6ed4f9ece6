-- Re-add a dead letter's action to its origin stream at most once. The re-add and the delete
-- from the dead-letter stream are on different slots, so they cannot be one script: a replay
-- cut off between them (a failover, a lost connection) is run again, and without a mark the
-- action would be re-added twice and its effect (a websocket.send, say) would happen twice.
-- The mark is on the origin stream's slot, so it is set in the same script as the re-add.
--
-- KEYS[1] the origin stream   KEYS[2] the replay mark of this dead letter (same slot)
-- ARGV[1] the action field's name   ARGV[2] the raw action   ARGV[3] the mark's ttl (s)
-- Returns {1, new entry id} when it re-added the action, {0, entry id of the earlier re-add}
-- when the mark says it already was (nothing is added).
local earlier = redis.call('GET', KEYS[2])
if earlier then
  return {0, earlier}
end
local added = redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], added, 'EX', ARGV[3])
return {1, added}
