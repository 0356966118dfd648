-- A new job (see publish_fn.lua). KEYS[15]: the tenant's index, KEYS[16]: the
-- idempotency key, KEYS[17]: the tenant's outbox, KEYS[18]: whose the job is (keys.py
-- job_tenant; not the tenant's slot: a Redis Cluster needs it written apart). Returns {1, epoch} created (the epoch
-- its first event is in), or {0, "<job id> <fingerprint>"} of the earlier job that used
-- the same idempotency key. Its first attempt waits in the outbox until arq has it:
-- the queue may be another Redis (outbox.py hands it over).
local K_INDEX, K_IDEM, K_OUTBOX, K_WHOSE = KEYS[15], KEYS[16], KEYS[17], KEYS[18]
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
redis.call('ZADD', K_OUTBOX, A_INDEX_SCORE, redis.call('HGET', K_JOB, 'arq_id'))
redis.call('EXPIRE', K_OUTBOX, A_TTL)
redis.call('SET', K_WHOSE, redis.call('HGET', K_JOB, 'tenant'), 'EX', A_TTL)
return {1, applied[4]}
