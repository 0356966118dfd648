-- Shared by every script. One call of a script is one atomic Redis round trip, so
-- subscribers, the stored snapshot, the lease and the arq queue never disagree.
--
-- KEYS: 1 job hash, 2 job log, 3 tenant log, 4 tenant seq, 5 leases, 6 arq queue or
--       the delayed set, 7 arq job key (or any key when not enqueueing), 8 the job's
--       output text, 9 the tenant's running set, 10 the stats stream
-- ARGV: 1 ttl, 2 job log cap, 3 tenant log cap, 4 kind, 5 event body (JSON without
--       its leading '{'), 6 expected statuses ("a,b" or ""), 7 output delta,
--       8 job channel, 9 tenant channel, 10 expected arq id (""), 11 lease deadline
--       ms (""), 12 job id, 13 arq job payload ("" = no enqueue), 14 its PX,
--       15 its score in KEYS[6], 16 its member in KEYS[6], 17 idempotency fingerprint
--       (create), 18 index score (create), 19 "1" to empty the output, 20 the tenant's
--       running limit on start ("" = none), 21..n field/value pairs to HSET
local TERMINAL = {completed = true, failed = true, cancelled = true}

local function enqueue()
  redis.call('SET', KEYS[7], ARGV[13], 'PX', ARGV[14])
  redis.call('ZADD', KEYS[6], ARGV[15], ARGV[16])
end

-- Running jobs per tenant, and the outcome of every finished or retried attempt.
local function account(job, before, status, now_ms)
  if status == before then return end
  if status == 'running' then redis.call('SADD', KEYS[9], ARGV[12]) end
  if before == 'running' then redis.call('SREM', KEYS[9], ARGV[12]) end
  if TERMINAL[status] or (before == 'running' and status == 'queued') then
    local row = status
    if not TERMINAL[status] then row = 'retried' end
    redis.call('XADD', KEYS[10], 'MAXLEN', '~', 20000, '*', 'j', ARGV[12],
      't', redis.call('HGET', job, 'type'), 's', row,
      'c', redis.call('HGET', job, 'created_at') or '',
      'r', redis.call('HGET', job, 'started_at') or '', 'f', now_ms / 1000)
  end
end

local function apply()
  local job = KEYS[1]
  local before = redis.call('HGET', job, 'status')
  local arq_before = redis.call('HGET', job, 'arq_id')
  local seq = redis.call('HINCRBY', job, 'seq', 1)
  local t = redis.call('TIME')
  local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('HSET', job, 'updated_at', now_ms)
  if #ARGV >= 21 then
    redis.call('HSET', job, unpack(ARGV, 21))
  end
  -- Output lives in its own string: APPEND is amortised O(1) however long the text.
  if ARGV[19] == '1' then
    redis.call('SET', KEYS[8], '')
  end
  if ARGV[7] ~= '' then
    redis.call('APPEND', KEYS[8], ARGV[7])
  end
  local status = redis.call('HGET', job, 'status')
  -- Leases follow the state: held while running, keyed by the attempt's arq id.
  if before == 'running' and status ~= 'running' and arq_before then
    redis.call('ZREM', KEYS[5], arq_before)
  end
  if status == 'running' and ARGV[11] ~= '' then
    redis.call('ZADD', KEYS[5], ARGV[11], redis.call('HGET', job, 'arq_id'))
  end
  account(job, before, status, now_ms)
  if ARGV[13] ~= '' then enqueue() end
  local data = '{"seq":' .. seq .. ',' .. ARGV[5]
  local tseq = redis.call('INCR', KEYS[4])
  -- Each log entry knows both sequences, so either stream can resume from either log.
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. seq, 'k', ARGV[4], 't', tseq,
    'd', data)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '0-' .. tseq, 'k', ARGV[4], 's', seq,
    'j', ARGV[12], 'd', data)
  for _, i in ipairs({1, 2, 3, 4, 8}) do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
  local msg = tseq .. ' ' .. seq .. ' ' .. ARGV[4] .. ' ' .. ARGV[12] .. ' ' .. data
  redis.call('PUBLISH', ARGV[8], msg)
  redis.call('PUBLISH', ARGV[9], msg)
  return {seq, status, redis.call('HGET', job, 'cancel') or ''}
end
