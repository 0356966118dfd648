-- An atomic view for a multiplexed stream: the tenant's position and the snapshots it
-- covers. KEYS: 1 tenant position, 2 tenant index. ARGV: 1 job hash key prefix, 2 how
-- many recent jobs to scan (0: none), 3 output key prefix, 4 the tenant epoch the
-- reader followed until now: when the tenant's history is another one, take the
-- scanned jobs touched in the new history too, not only the active ones, 5.. named job
-- ids (always taken). Returns {tseq, tenant epoch, id1, fields1, output1,
-- ...}; a missing named job gets an empty list.
-- (Job hash names are derived from ARGV: the tenant's prefix, so in the tenant's slot.)
local pos = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
local tepoch = pos[2] or ''
local out = {tonumber(pos[1] or '0'), tepoch}
local moved = ARGV[4] ~= '' and ARGV[4] ~= tepoch
local seen = {}
local function add(id)
  seen[id] = true
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. id)
  out[#out + 1] = redis.call('GET', ARGV[3] .. id) or ''
end
for i = 5, #ARGV do add(ARGV[i]) end
local recent = tonumber(ARGV[2])
if recent > 0 then
  for _, id in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, recent - 1)) do
    local job = redis.call('HMGET', ARGV[1] .. id, 'status', 'tep')
    local active = job[1] == 'queued' or job[1] == 'running'
    local touched = moved and job[2] == tepoch
    if not seen[id] and (active or touched) then add(id) end
  end
end
return out
