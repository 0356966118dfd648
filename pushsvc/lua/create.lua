-- A new job (see publish_fn.lua). KEYS[10]: the tenant's index, KEYS[11]: the
-- idempotency key. ARGV: publish_fn.lua's. (Whose the job is and the tenants' list are
-- written just before, in the same round trip: store.py.)
-- Returns {1, epoch} created (the epoch its first event is in), or
-- {0, "<job id> <fingerprint>"} of the earlier job that used the same idempotency key.
-- Its first attempt waits in the outbox until arq has it: the queue may be another
-- Redis (store.py hands it over; outbox.py's sweeper, what a crash left). The outbox entry is written first: a script that
-- fails half way is not undone, and the sweeper lets go of an entry whose job is not
-- queued for it, but could not find a job the outbox does not name.
local K_INDEX, K_IDEM = KEYS[10], KEYS[11]
if A_FINGERPRINT ~= '' then
  local existing = redis.call('GET', K_IDEM)
  if existing then return {0, existing} end
  redis.call('SET', K_IDEM, A_JOB_ID .. ' ' .. A_FINGERPRINT, 'EX', A_TTL)
end
if redis.call('EXISTS', K_JOB) == 1 then
  return redis.error_reply('job id collision')
end
local function field(name)  -- one of the fields the job is made with
  for i = FIELDS_FROM, #ARGV, 2 do
    if ARGV[i] == name then return ARGV[i + 1] end
  end
end
local t = redis.call('TIME')  -- the outbox's clock is Redis's: the sweeper reads it too
redis.call('ZADD', K_OUTBOX, t[1] * 1000 + math.floor(t[2] / 1000), field('arq_id'))
redis.call('EXPIRE', K_OUTBOX, A_TTL)
local applied = apply()
redis.call('ZADD', K_INDEX, A_INDEX_SCORE, A_JOB_ID)
redis.call('EXPIRE', K_INDEX, A_TTL)
return {1, applied[4]}
