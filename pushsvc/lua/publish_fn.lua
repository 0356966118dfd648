-- Shared by every script. One call of a script is one atomic Redis round trip, so
-- subscribers, the stored snapshot and the job's logs never disagree. Every key is the
-- tenant's (one hash tag: one slot on a Redis Cluster).
-- store.py lays KEYS and ARGV out (PublishCall.layout); their names:
local K_JOB, K_LOG, K_TLOG, K_TPOS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_OUTPUT, K_RUNNING, K_STATS, K_EPOCH = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_OUTBOX = KEYS[9]
-- (create.lua: KEYS[10] tenant index, KEYS[11] idempotency key, ...; repair.lua:
-- KEYS[10] tenant index)
local A_TTL, A_LOG_CAP, A_TLOG_CAP, A_KIND, A_BODY = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local A_EXPECT, A_DELTA, A_JOB_CHANNEL, A_TENANT_CHANNEL = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local A_ARQ_ID, A_JOB_ID, A_NEXT_ARQ_ID, A_NEXT_DELAY_MS = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local A_FINGERPRINT, A_INDEX_SCORE, A_RESET_OUTPUT = ARGV[14], ARGV[15], ARGV[16]
local A_MAX_RUNNING, A_OWNER, A_KNOWN_EPOCH, A_FRESH_EPOCH = ARGV[17], ARGV[18], ARGV[19], ARGV[20]
local A_KNOWN_SEQ = ARGV[21]
-- A second event in the same call (a worker's flush: progress, then the text written
-- since): its kind ('' for none), body and delta; the fields and the rest go with the first.
local A_KIND2, A_BODY2, A_DELTA2 = ARGV[22], ARGV[23], ARGV[24]
-- The run id of the Redis the caller's connection check found ('' for none: epoch.py).
local A_RUN_ID = ARGV[25]
-- A worker's token for this call ('' for none), the same when it sends the call again
-- after its reply was lost: publish.lua answers a call it already made as it did.
local A_CALL = ARGV[26]
local FIELDS_FROM = 27  -- ARGV[27..]: field/value pairs to HSET
local TERMINAL = {completed = true, failed = true, cancelled = true}

-- The attempt the change queues (A_NEXT_ARQ_ID: a retry, a re-run, a throttled start)
-- waits in the tenant's outbox, by Redis's time (plus its delay), for its caller to hand
-- it to arq (store.py; the queue may be another Redis); a caller that crashes leaves it
-- to the outbox's sweeper (outbox.py).
local function to_outbox()
  local t = redis.call('TIME')
  local due = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(A_NEXT_DELAY_MS)
  redis.call('ZADD', K_OUTBOX, due, A_NEXT_ARQ_ID)
  redis.call('EXPIRE', K_OUTBOX, A_TTL)
end

-- The store's epoch as the tenant's slot knows it: a new one when the Redis that holds
-- the slot is not the one it was taken on (a restart, a failover: the caller's
-- connection check found another run id), or when it is missing (the data went: an
-- empty restart, FLUSHALL, a lost key). Every sequence of the tenant then starts a new
-- history at its next event. (A slot moved to another node by a resharding counts as
-- another Redis too: its streams get a reset snapshot; a reset is safe, a loss unseen
-- is not.)
local function store_epoch()
  local cur = redis.call('HMGET', K_EPOCH, 'id', 'run')
  if cur[1] and (A_RUN_ID == '' or cur[2] == A_RUN_ID) then return cur[1] end
  redis.call('HSET', K_EPOCH, 'id', A_FRESH_EPOCH, 'run', A_RUN_ID)
  if cur[1] then  -- another Redis than it was taken on: missing jobs get a grace (grace.lua)
    redis.call('HSET', K_EPOCH, 'recovered_at', redis.call('TIME')[1])
  end
  return A_FRESH_EPOCH
end

-- A sequence (job or tenant) keeps its epoch while the store's epoch stays; created
-- anew, or first written under another store epoch, it starts a new history.
local function sequence_epoch(key, g)
  local cur = redis.call('HMGET', key, 'epoch', 'gen')
  if cur[1] and cur[2] == g then return cur[1], false end
  redis.call('HSET', key, 'epoch', A_FRESH_EPOCH, 'gen', g)
  return A_FRESH_EPOCH, not cur[1]
end

-- Running jobs per tenant, and the outcome of every finished or retried attempt.
local function account(job, before, status, now_ms)
  if status == before then return end
  if status == 'running' then redis.call('SADD', K_RUNNING, A_JOB_ID) end
  if before == 'running' then redis.call('SREM', K_RUNNING, A_JOB_ID) end
  if TERMINAL[status] or (before == 'running' and status == 'queued') then
    local row = status
    if not TERMINAL[status] then row = 'retried' end
    redis.call('XADD', K_STATS, 'MAXLEN', '~', 20000, '*', 'j', A_JOB_ID,
      't', redis.call('HGET', job, 'type'), 's', row,
      'n', redis.call('HGET', job, 'tenant') or '',
      'c', redis.call('HGET', job, 'created_at') or '',
      'r', redis.call('HGET', job, 'started_at') or '', 'f', now_ms / 1000)
    redis.call('EXPIRE', K_STATS, A_TTL)
  end
end

-- One event: ``first`` also sets the fields, resets the output and enqueues.
local function apply_event(kind, body, delta, first)
  local job = K_JOB
  local before = redis.call('HGET', job, 'status')
  local g = store_epoch()
  local epoch = sequence_epoch(job, g)
  local seq = redis.call('HINCRBY', job, 'seq', 1)
  local t = redis.call('TIME')
  local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('HSET', job, 'updated_at', now_ms)
  if first and #ARGV >= FIELDS_FROM then
    redis.call('HSET', job, unpack(ARGV, FIELDS_FROM))
  end
  -- Output lives in its own string: APPEND is amortised O(1) however long the text.
  if first and A_RESET_OUTPUT == '1' then
    redis.call('SET', K_OUTPUT, '')
  end
  if delta ~= '' then
    redis.call('APPEND', K_OUTPUT, delta)
  end
  local status = redis.call('HGET', job, 'status')
  -- (An attempt's lease and its turn's start are the worker's calls: leases.py, queue.py.)
  account(job, before, status, now_ms)
  if first and A_NEXT_ARQ_ID ~= '' then to_outbox() end
  local data = '{"seq":' .. seq .. ',' .. body
  local tepoch, tenant_new = sequence_epoch(K_TPOS, g)
  if tenant_new then redis.call('DEL', K_TLOG) end  -- its ids start again at 1
  local tseq = redis.call('HINCRBY', K_TPOS, 'seq', 1)
  -- The tenant history the job was last touched in: a stream that follows the tenant
  -- into a new history reads these jobs (lua/read.lua).
  if redis.call('HGET', job, 'tep') ~= tepoch then redis.call('HSET', job, 'tep', tepoch) end
  -- Each log entry knows both sequences, so either stream can resume from either log.
  redis.call('XADD', K_LOG, 'MAXLEN', '~', A_LOG_CAP, '0-' .. seq, 'k', kind, 't', tseq,
    'd', data)
  redis.call('XADD', K_TLOG, 'MAXLEN', '~', A_TLOG_CAP, '0-' .. tseq, 'k', kind, 's', seq,
    'e', epoch, 'j', A_JOB_ID, 'd', data)
  for _, key in ipairs({K_JOB, K_LOG, K_TLOG, K_TPOS, K_OUTPUT}) do
    redis.call('EXPIRE', key, A_TTL)
  end
  local msg = tseq .. '.' .. tepoch .. ' ' .. seq .. '.' .. epoch .. ' ' .. kind .. ' '
    .. A_JOB_ID .. ' ' .. data
  redis.call('PUBLISH', A_JOB_CHANNEL, msg)
  redis.call('PUBLISH', A_TENANT_CHANNEL, msg)
  return {seq, status, redis.call('HGET', job, 'cancel') or '', epoch}
end

-- The call's event, and its second event when it has one; replies as for the last.
local function apply()
  local reply = apply_event(A_KIND, A_BODY, A_DELTA, true)
  if A_KIND2 ~= '' then reply = apply_event(A_KIND2, A_BODY2, A_DELTA2, false) end
  return reply
end
