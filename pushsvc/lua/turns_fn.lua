-- Fair share (queue.py): an attempt's place in arq's queue is a turn of its class.
-- A turn owner (a tenant) takes the turn after its last one (`slot` further), never one
-- before the class's clock (the turn of the attempt that started last).
local CLASS_BASE = {high = 3e15, normal = 2e15, low = 1e15}

-- The class's clock; lost with the Redis that held it (a restart without its data), it
-- starts again at the first attempt still queued in the class, so none jumps the line.
local function clock_of(turns, queue, class)
  local clock = redis.call('HGET', turns, class)
  if clock then return tonumber(clock) end
  local base = CLASS_BASE[class]
  local upto = '(' .. string.format('%.0f', 1e15 - base)  -- the next class up starts there
  local head = redis.call('ZRANGEBYSCORE', queue, -base, upto, 'WITHSCORES', 'LIMIT', 0, 1)
  if head[2] then return tonumber(head[2]) + base end
  return 0
end

local function turn_score(turns, queue, owner_key, class, slot)
  if not CLASS_BASE[class] then class = 'normal' end
  local clock = clock_of(turns, queue, class)
  local last = redis.call('HGET', owner_key, class)
  local turn = clock
  if last then turn = math.max(clock, tonumber(last) + tonumber(slot)) end
  redis.call('HSET', owner_key, class, string.format('%.0f', turn), 'slot', slot)
  redis.call('EXPIRE', owner_key, 86400)
  return string.format('%.0f', turn - CLASS_BASE[class])
end

-- An attempt starts: its class's clock moves up to its turn.
local function turn_started(turns, queue, class, arq_id)
  if not CLASS_BASE[class] then class = 'normal' end
  local score = redis.call('ZSCORE', queue, arq_id)
  if not score then return end
  local turn = tonumber(score) + CLASS_BASE[class]
  local clock = clock_of(turns, queue, class)
  if turn > clock then redis.call('HSET', turns, class, string.format('%.0f', turn)) end
end
