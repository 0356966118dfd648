-- Queued attempts' places in line (see line.py), for a batch of jobs in one round trip.
-- KEYS: 1 arq's queue (sorted set of arq ids), 2 leases (running arq ids),
--       3..2+n the asked jobs' hashes, then the start counters (one per second, oldest first).
-- ARGV: 1 n (how many jobs).
-- Returns {per job: status, seq, epoch, position (0: not in line)}, {start counts}.
--
-- The position comes from the set's ORDER (ZRANK), never from its scores (priorities and
-- fair share decide the scores): 1 + the attempts ranked before it that have not started.
-- arq keeps a running attempt in its set until it ends; running ones are in the leases
-- set and are few, so their ranks are read once and each asked job costs two O(log N)
-- lookups however long the queue.
local K_QUEUE, K_LEASES = KEYS[1], KEYS[2]
local n = tonumber(ARGV[1])

local running = {}
for _, arq_id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
  local rank = redis.call('ZRANK', K_QUEUE, arq_id)
  if rank then running[#running + 1] = rank end
end
table.sort(running)

-- How many running attempts rank before ``rank`` (binary search).
local function running_before(rank)
  local lo, hi = 1, #running
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    if running[mid] < rank then lo = mid + 1 else hi = mid - 1 end
  end
  return lo - 1
end

local out = {}
for i = 1, n do
  local job = redis.call('HMGET', KEYS[2 + i], 'status', 'seq', 'epoch', 'arq_id')
  local position = 0
  if job[1] == 'queued' and job[4] then
    local rank = redis.call('ZRANK', K_QUEUE, job[4])
    if rank and not redis.call('ZSCORE', K_LEASES, job[4]) then
      position = rank - running_before(rank) + 1
    end
  end
  out[#out + 1] = job[1] or ''
  out[#out + 1] = job[2] or '0'
  out[#out + 1] = job[3] or ''
  out[#out + 1] = position
end

local starts = {}
if #KEYS > 2 + n then
  starts = redis.call('MGET', unpack(KEYS, 3 + n))
end
return {out, starts}
