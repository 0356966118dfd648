-- A new job (see publish_fn.lua). KEYS 11: the tenant's index, 12: the idempotency key.
-- Returns {1, job id} created, or {0, "<job id> <fingerprint>"} of the earlier job that
-- used the same idempotency key.
if ARGV[17] ~= '' then
  local existing = redis.call('GET', KEYS[12])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[12], ARGV[12] .. ' ' .. ARGV[17], 'EX', ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('job id collision')
end
apply()
redis.call('ZADD', KEYS[11], ARGV[18], ARGV[12])
redis.call('EXPIRE', KEYS[11], ARGV[1])
return {1, ARGV[12]}
