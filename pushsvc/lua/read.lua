-- An atomic view for a multiplexed stream: the tenant's seq and the snapshots it covers.
-- KEYS: 1 tenant seq, 2 tenant index. ARGV: 1 job hash key prefix, 2 how many recent
-- jobs to consider when no job is named, 3 output key prefix, 4.. named job ids.
-- Returns {tseq, id1, fields1, output1, ...}; a missing job gets an empty list.
-- (Job hash names are derived from ARGV: fine on one Redis; Redis Cluster needs tags.)
local out = {tonumber(redis.call('GET', KEYS[1]) or '0')}
local function add(id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
  out[#out + 1] = redis.call('GET', ARGV[3] .. id) or ''
end
if #ARGV > 3 then
  for i = 4, #ARGV do add(ARGV[i]) end
else
  for _, id in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)) do
    local status = redis.call('HGET', ARGV[1] .. id, 'status')
    if status == 'queued' or status == 'running' then add(id) end
  end
end
return out
