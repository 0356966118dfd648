-- One model's limits, shared by every worker (see pushsvc/model_limits.py).
-- KEYS[1]: the buckets hash (r_level, r_ts: requests; t_level, t_ts: tokens; q_holder,
-- q_first, q_until: the call first in line), KEYS[2]: the concurrency holders (sorted
-- set, member -> expiry ms). Times are Redis's (TIME), so every worker shares one clock. A
-- bucket's level is as of its ts, which may lie ahead: the start of the last reservation.
-- Requests reserve: a bucket may go below zero, and the call starts when every bucket has
-- refilled its share (the reply's start), in order; but no further ahead than the
-- horizon (one call's step plus up to a second more), so a reservation left unused (its
-- call cancelled) costs the model at most that long. A call refused asks again; the
-- oldest call refused so far (first in line) is served before any younger one.
--
-- ARGV[1] is the operation:
--   acquire holder hold_ms concurrency r_cap r_rate t_cap t_rate tokens ttl_ms first_ms
--     -> {1, start_ms, now_ms} granted: start reserved, a concurrency slot held until
--        start + hold_ms; or refused: {0, start_ms (-1: every slot is taken), now_ms,
--        first_ms, ask_in_ms (-1: unknown, a slot), 1 when the call is first in line}.
--     Rates are per ms; a cap of 0 is no such bucket, a concurrency of 0 no such limit;
--     first_ms is when the call first asked (0: now), as the first refusal said.
--   renew holder hold_ms -> 1, or 0 when the slot was taken back (it expired)
--   release holder start_ms tokens -> 1 (frees the slot and the place in line; a call
--     that never started gives back what it reserved, when nothing was reserved after it)
--   charge tokens ttl_ms -> 1 (a call used more tokens than reserved: a debt)
local K_BUCKETS, K_HOLDERS = KEYS[1], KEYS[2]
local op = ARGV[1]
local SLACK_MS, LINE_MS = 1000, 2000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function read(prefix)
  local v = redis.call('HMGET', K_BUCKETS, prefix .. '_level', prefix .. '_ts')
  if not v[1] then return nil, nil end
  return tonumber(v[1]), tonumber(v[2])
end

-- When a bucket (full when new) holds ``cost``: never before its last reservation.
local function ready_at(prefix, cap, rate, cost)
  local level, ts = read(prefix)
  if not level then level, ts = cap, now end
  local base = math.max(now, ts)
  local avail = math.min(cap, level + (base - ts) * rate)
  if avail >= cost then return base end
  return base + math.ceil((cost - avail) / rate)
end

local function take(prefix, cap, rate, cost, at)
  local level, ts = read(prefix)
  if not level then level, ts = cap, now end
  local avail = math.min(cap, level + (at - ts) * rate)
  redis.call('HSET', K_BUCKETS, prefix .. '_level', avail - cost, prefix .. '_ts', at)
end

local function expire_buckets(start, ttl_ms)
  redis.call('PEXPIRE', K_BUCKETS, math.max(0, start - now) + ttl_ms)
end

-- How far ahead a call may reserve its start: one step of the slowest bucket (a call's
-- share of it), plus as much again up to SLACK_MS, room for the next call to ask in time.
local function horizon(r_cap, r_rate, t_cap, t_rate, tokens)
  local step = 0
  if r_cap > 0 then step = 1 / r_rate end
  if t_cap > 0 then step = math.max(step, tokens / t_rate) end
  return math.ceil(step + math.min(step, SLACK_MS))
end

-- Is it this call's turn: no older call, refused and still asking, is first in line?
local function in_turn(holder, first)
  local q = redis.call('HMGET', K_BUCKETS, 'q_holder', 'q_first', 'q_until')
  return not (q[1] and q[1] ~= holder and tonumber(q[3]) > now and tonumber(q[2]) <= first)
end

local function queue_first(holder, first, ask_in)
  local keep = math.max(ask_in, 0) + LINE_MS  -- it asks again by then, or loses its place
  redis.call('HSET', K_BUCKETS, 'q_holder', holder, 'q_first', first, 'q_until', now + keep)
  if redis.call('PTTL', K_BUCKETS) < keep then redis.call('PEXPIRE', K_BUCKETS, keep) end
end

local function leave_line(holder)
  if redis.call('HGET', K_BUCKETS, 'q_holder') == holder then
    redis.call('HDEL', K_BUCKETS, 'q_holder', 'q_first', 'q_until')
  end
end

if op == 'acquire' then
  local holder, hold_ms, concurrency = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local r_cap, r_rate = tonumber(ARGV[5]), tonumber(ARGV[6])
  local t_cap, t_rate = tonumber(ARGV[7]), tonumber(ARGV[8])
  local tokens, ttl_ms, first = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  if first <= 0 then first = now end
  local start = now
  if r_cap > 0 then start = math.max(start, ready_at('r', r_cap, r_rate, 1)) end
  if t_cap > 0 then start = math.max(start, ready_at('t', t_cap, t_rate, tokens)) end
  local free = true
  if concurrency > 0 then
    redis.call('ZREMRANGEBYSCORE', K_HOLDERS, '-inf', now)
    free = redis.call('ZCARD', K_HOLDERS) < concurrency
  end
  local reach = horizon(r_cap, r_rate, t_cap, t_rate, tokens)
  local turn = in_turn(holder, first)
  if not (free and turn and start - now <= reach) then
    local ask_in, said = -1, -1
    if free then ask_in, said = math.max(0, start - reach - now), start end
    if turn then queue_first(holder, first, ask_in) end
    return {0, said, now, first, ask_in, turn and 1 or 0}
  end
  leave_line(holder)
  if concurrency > 0 then
    redis.call('ZADD', K_HOLDERS, start + hold_ms, holder)
    redis.call('PEXPIRE', K_HOLDERS, start - now + hold_ms * 2)
  end
  if r_cap > 0 then take('r', r_cap, r_rate, 1, start) end
  if t_cap > 0 then take('t', t_cap, t_rate, tokens, start) end
  if r_cap > 0 or t_cap > 0 then expire_buckets(start, ttl_ms) end
  return {1, start, now}
elseif op == 'renew' then
  local holder, hold_ms = ARGV[2], tonumber(ARGV[3])
  if not redis.call('ZSCORE', K_HOLDERS, holder) then return 0 end
  redis.call('ZADD', K_HOLDERS, now + hold_ms, holder)
  redis.call('PEXPIRE', K_HOLDERS, hold_ms * 2)
  return 1
elseif op == 'release' then
  local holder, start, tokens = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  redis.call('ZREM', K_HOLDERS, holder)
  leave_line(holder)
  if now < start then
    -- Given back only by the last reservation: an earlier one's share already moved
    -- every later start, and handing it to a newcomer could start two calls too close.
    for _, b in ipairs({{'r', 1}, {'t', tokens}}) do
      local level, ts = read(b[1])
      if level and ts == start then
        redis.call('HSET', K_BUCKETS, b[1] .. '_level', level + b[2])
      end
    end
  end
  return 1
elseif op == 'charge' then
  local tokens, ttl_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
  local level, ts = read('t')
  if level then
    redis.call('HSET', K_BUCKETS, 't_level', level - tokens)
    expire_buckets(ts, ttl_ms)
  end
  return 1
end
return redis.error_reply('model_limits.lua: unknown operation ' .. tostring(op))
