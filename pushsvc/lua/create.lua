-- KEYS: job, job log, tenant log, tenant seq, tenant index, idempotency key
-- ARGV: ttl, cap, tcap, kind, body, created_ms, job id, job channel, tenant channel,
--       idempotency fingerprint ("" for none), then field/value pairs to HSET
-- Returns {1, job id} created, or {0, "<job id> <fingerprint>"} of the earlier job that
-- used the same idempotency key.
if ARGV[10] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[6], ARGV[7] .. ' ' .. ARGV[10], 'EX', ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('job id collision')
end
local fields = {}
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
publish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  '', ARGV[8], ARGV[9], fields)
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[7])
redis.call('EXPIRE', KEYS[5], ARGV[1])
return {1, ARGV[7]}
