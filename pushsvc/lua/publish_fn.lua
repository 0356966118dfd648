-- Shared by every script: bump the job's seq and the tenant's seq, apply fields,
-- append output, log the event (job log and tenant log, both capped) and PUBLISH it.
-- One call of a script is one Redis round trip and atomic, so subscribers and the
-- stored state never disagree about the order of events.
local function publish(job, log, tlog, tseqk, ttl, cap, tcap, kind, body, delta, jchan, tchan, fields)
  local seq = redis.call('HINCRBY', job, 'seq', 1)
  if #fields > 0 then
    redis.call('HSET', job, unpack(fields))
  end
  if delta ~= '' then
    local out = redis.call('HGET', job, 'output') or ''
    redis.call('HSET', job, 'output', out .. delta)
  end
  local data = '{"seq":' .. seq .. ',' .. body
  local tseq = redis.call('INCR', tseqk)
  redis.call('XADD', log, 'MAXLEN', '~', cap, '0-' .. seq, 'k', kind, 'd', data)
  redis.call('XADD', tlog, 'MAXLEN', '~', tcap, '0-' .. tseq, 'k', kind, 'd', data)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', log, ttl)
  redis.call('EXPIRE', tlog, ttl)
  redis.call('EXPIRE', tseqk, ttl)
  local msg = tseq .. ' ' .. kind .. ' ' .. data
  redis.call('PUBLISH', jchan, msg)
  redis.call('PUBLISH', tchan, msg)
  return seq
end
