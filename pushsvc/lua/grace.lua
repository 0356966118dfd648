-- A tenant's grace for missing jobs, on a Redis Cluster (store.grace_left): the seconds
-- since its shard last failed over or restarted with data (its epoch's `recovered_at`,
-- noted where a new epoch is taken: publish_fn.lua), -1 when none is noted.
-- KEYS[1] the tenant's epoch hash; ARGV[1] the run id of the node the call reached
-- (epoch.RUN_ID_MARK), ARGV[2] a fresh epoch. A node other than the one the epoch was
-- taken on, before any publish of the tenant noticed: the epoch is taken over here, as
-- the publish script would, so the grace starts now for every reader.
local cur = redis.call('HMGET', KEYS[1], 'id', 'run', 'recovered_at')
local now = tonumber(redis.call('TIME')[1])
if cur[1] and ARGV[1] ~= '' and cur[2] ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'id', ARGV[2], 'run', ARGV[1], 'recovered_at', now)
  return 0
end
if not cur[3] then return -1 end
return math.max(0, now - tonumber(cur[3]))  -- noted by another node: its clock may lead
