-- A transition of an existing job (see publish_fn.lua for KEYS and ARGV).
-- Returns {-1} unknown job, {-3, status, seq, epoch} the writer's history is not the
-- store's (the worker repairs), {0, status} refused (state, attempt or owner), {-2} the
-- tenant is at its running limit (the attempt given waits in the outbox, nothing
-- published), else {seq, status, cancel flag, epoch}.
local cur = redis.call('HMGET', K_JOB, 'status', 'epoch', 'seq', 'arq_id', 'owner')
local status = cur[1]
if not status then return {-1} end
-- A worker's call made already (its token is the job's last, lua/publish_fn.lua: its reply
-- was lost): answered as made, with the job as it is now, and not made twice.
if A_CALL ~= '' and redis.call('HGET', K_JOB, 'wcall') == A_CALL then
  local now = redis.call('HMGET', K_JOB, 'seq', 'cancel', 'epoch')
  return {tonumber(now[1]), status, now[2] or '', now[3]}
end
if A_KNOWN_EPOCH ~= '' and (cur[2] ~= A_KNOWN_EPOCH or tonumber(cur[3]) < tonumber(A_KNOWN_SEQ)) then
  return {-3, status, cur[3], cur[2] or ''}
end
if A_EXPECT ~= '' then
  local ok = false
  for s in string.gmatch(A_EXPECT, '[^,]+') do
    if s == status then ok = true end
  end
  if not ok then return {0, status} end
end
if A_ARQ_ID ~= '' and cur[4] ~= A_ARQ_ID then
  return {0, status}  -- a superseded attempt may not write
end
if A_OWNER ~= '' and cur[5] ~= A_OWNER then
  return {0, status}  -- another worker took this attempt over
end
if A_MAX_RUNNING ~= '' and redis.call('SCARD', K_RUNNING) >= tonumber(A_MAX_RUNNING) then
  -- Over the tenant's limit: hand the attempt a later slot; others' jobs go first.
  redis.call('HSET', K_JOB, 'arq_id', A_NEXT_ARQ_ID)
  to_outbox()
  return {-2}
end
local reply = apply()
if A_CALL ~= '' then redis.call('HSET', K_JOB, 'wcall', A_CALL) end  -- once it was made
return reply
