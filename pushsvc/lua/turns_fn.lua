-- Fair share (queue.py): an attempt's place in arq's queue is a turn of its class.
-- A turn owner (a tenant) takes the turn after its last attempt still in line (`slot`
-- further), never one before the class's clock (the turn of the attempt that started
-- last). The owner's attempts in line are a sorted set (arq id by arq score), so an
-- owner whose attempts all started or were cancelled takes the clock's turn again.
local CLASS_BASE = {high = 3e15, normal = 2e15, low = 1e15}

local function fmt(n) return string.format('%.0f', n) end

-- Scores of one class: from -base up to (not including) the next class's lowest.
local function class_range(class)
  local base = CLASS_BASE[class]
  return fmt(-base), '(' .. fmt(1e15 - base)
end

-- The class's clock; lost with the Redis that held it (a restart without its data), it
-- starts again at the first attempt still queued in the class, so none jumps the line.
local function clock_of(turns, queue, class)
  local clock = redis.call('HGET', turns, class)
  if clock then return tonumber(clock) end
  local lo, hi = class_range(class)
  local head = redis.call('ZRANGEBYSCORE', queue, lo, hi, 'WITHSCORES', 'LIMIT', 0, 1)
  if head[2] then return tonumber(head[2]) + CLASS_BASE[class] end
  return 0
end

-- The owner's last turn in the class: its highest attempt still in arq's queue (ones
-- started, cancelled or dropped since are let go on the way).
local function last_turn(owner_q, queue, class)
  local lo, hi = class_range(class)
  for _ = 1, 32 do
    local top = redis.call('ZREVRANGEBYSCORE', owner_q, hi, lo, 'WITHSCORES', 'LIMIT', 0, 1)
    if not top[1] then return nil end
    if redis.call('ZSCORE', queue, top[1]) then return tonumber(top[2]) + CLASS_BASE[class] end
    redis.call('ZREM', owner_q, top[1])
  end
  return nil
end

-- The score of `arq_id`'s turn, noted in its owner's line.
local function turn_score(turns, queue, owner_q, class, slot, arq_id)
  if not CLASS_BASE[class] then class = 'normal' end
  local clock = clock_of(turns, queue, class)
  local last = last_turn(owner_q, queue, class)
  local turn = clock
  if last then turn = math.max(clock, last + tonumber(slot)) end
  local score = fmt(turn - CLASS_BASE[class])
  redis.call('ZADD', owner_q, score, arq_id)
  redis.call('EXPIRE', owner_q, 86400)
  return score
end

-- An attempt starts: it leaves its owner's line; its class's clock moves up to its turn.
local function turn_started(turns, queue, owner_q, class, arq_id)
  if not CLASS_BASE[class] then class = 'normal' end
  redis.call('ZREM', owner_q, arq_id)
  local score = redis.call('ZSCORE', queue, arq_id)
  if not score then return end
  local turn = tonumber(score) + CLASS_BASE[class]
  local clock = clock_of(turns, queue, class)
  if turn > clock then redis.call('HSET', turns, class, fmt(turn)) end
end
