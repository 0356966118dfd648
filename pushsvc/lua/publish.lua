-- KEYS: job, job log, tenant log, tenant seq
-- ARGV: ttl, cap, tcap, kind, body, expect ("a,b" or ""), delta, job channel,
--       tenant channel, then field/value pairs to HSET
-- Returns {-1} unknown job, {0, status} state not in expect, {seq, status, cancel}.
local job = KEYS[1]
local status = redis.call('HGET', job, 'status')
if not status then return {-1} end
local expect = ARGV[6]
if expect ~= '' then
  local ok = false
  for s in string.gmatch(expect, '[^,]+') do
    if s == status then ok = true end
  end
  if not ok then return {0, status} end
end
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
local seq = publish(job, KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], ARGV[7], ARGV[8], ARGV[9], fields)
return {seq, redis.call('HGET', job, 'status'), redis.call('HGET', job, 'cancel') or ''}
