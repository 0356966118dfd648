-- A new job (see publish_fn.lua). KEYS[15]: the tenant's index, KEYS[16]: the
-- idempotency key. Returns {1, epoch} created (the epoch its first event is in), or
-- {0, "<job id> <fingerprint>"} of the earlier job that used the same idempotency key.
local K_INDEX, K_IDEM = KEYS[15], KEYS[16]
if A_FINGERPRINT ~= '' then
  local existing = redis.call('GET', K_IDEM)
  if existing then return {0, existing} end
  redis.call('SET', K_IDEM, A_JOB_ID .. ' ' .. A_FINGERPRINT, 'EX', A_TTL)
end
if redis.call('EXISTS', K_JOB) == 1 then
  return redis.error_reply('job id collision')
end
local applied = apply()
redis.call('ZADD', K_INDEX, A_INDEX_SCORE, A_JOB_ID)
redis.call('EXPIRE', K_INDEX, A_TTL)
return {1, applied[4]}
