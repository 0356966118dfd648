-- Hand one attempt to arq (store.py after the change that queued it; the outbox's
-- sweeper, outbox.py): arq's job record and its place in arq's queue, at its turn
-- (turns_fn.lua), or in pushsvc's delayed set. Not while arq holds the attempt (its record: queued or
-- running), nor when its job no longer waits for it (started, cancelled, re-run, gone:
-- arq drops an attempt's record when it ends, so that is what stops a late hand-over).
-- KEYS: 1 arq's job record, 2 arq's result key, 3 the target set, 4 turns, 5 the turn
-- owner's line, 6 arq's queue; 7 and 8 when they are on this Redis (one plane): the
-- outbox the attempt leaves and its job's hash. ARGV: 1 payload, 2 px, 3 score ('' for
-- a turn), 4 member, 5 priority class, 6 turn slot, 7 the arq id.
-- Returns 1 queued, 0 not (and it left the outbox).
-- The record and the outbox entry go last: a script that fails half way is not undone;
-- a record without its place in the queue would pass for an attempt arq has, and the
-- outbox entry is the sweeper's only trace of the attempt.
local function leave_outbox()
  if KEYS[7] then redis.call('ZREM', KEYS[7], ARGV[7]) end
end
if KEYS[8] then
  local job = redis.call('HMGET', KEYS[8], 'status', 'arq_id')
  if job[1] ~= 'queued' or job[2] ~= ARGV[7] then
    leave_outbox()
    return 0
  end
end
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  leave_outbox()
  return 0
end
local score = ARGV[3]
if score == '' then
  score = turn_score(KEYS[4], KEYS[6], KEYS[5], ARGV[5], ARGV[6], ARGV[4])
end
redis.call('ZADD', KEYS[3], score, ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
leave_outbox()
return 1
