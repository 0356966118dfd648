-- Queued attempts' places in line (see line.py), for a batch of attempts in one call.
-- Reads the queue plane only (arq's queue, the leases, the start counters): the jobs'
-- states are read apart (on a Redis Cluster they live in their tenants' slots).
-- KEYS: 1 arq's queue (sorted set of arq ids), 2 leases (running arq ids), 3.. the start
--       counters (one per second, oldest first).
-- ARGV: the arq ids of the attempts the asked jobs wait for.
-- Returns {per arq id: its position (0: not in line)}, {start counts}.
--
-- The position comes from the set's ORDER (ZRANK), never from its scores (priorities and
-- fair share decide the scores): 1 + the attempts ranked before it that have not started.
-- arq keeps a running attempt in its set until it ends; running ones are in the leases
-- set and are few, so their ranks are read once and each asked attempt costs two
-- O(log N) lookups however long the queue.
local K_QUEUE, K_LEASES = KEYS[1], KEYS[2]

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
for i, arq_id in ipairs(ARGV) do
  local position = 0
  local rank = redis.call('ZRANK', K_QUEUE, arq_id)
  if rank and not redis.call('ZSCORE', K_LEASES, arq_id) then
    position = rank - running_before(rank) + 1
  end
  out[i] = position
end

local starts = {}
if #KEYS > 2 then
  starts = redis.call('MGET', unpack(KEYS, 3))
end
return {out, starts}
