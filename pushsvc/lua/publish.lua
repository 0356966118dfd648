-- A transition of an existing job (see publish_fn.lua for KEYS and ARGV).
-- Returns {-1} unknown job, {0, status} refused (state or attempt), {-2} the tenant is
-- at its running limit (the attempt was re-queued as given, nothing published), else
-- {seq, status, cancel flag}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1} end
if ARGV[6] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[6], '[^,]+') do
    if s == status then ok = true end
  end
  if not ok then return {0, status} end
end
if ARGV[10] ~= '' and redis.call('HGET', KEYS[1], 'arq_id') ~= ARGV[10] then
  return {0, status}  -- a superseded attempt may not write
end
if ARGV[20] ~= '' and redis.call('SCARD', KEYS[9]) >= tonumber(ARGV[20]) then
  -- Over the tenant's limit: hand the attempt a later slot; others' jobs go first.
  redis.call('HSET', KEYS[1], 'arq_id', ARGV[16]:match('[^|]+$'))
  enqueue()
  return {-2}
end
return apply()
