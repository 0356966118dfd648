-- Hand one attempt to arq (the outbox's mover and sweeper, outbox.py): arq's job record
-- and its place in arq's queue (or pushsvc's delayed set), unless arq has the attempt
-- already, queued, running or with its result kept (arq's job-id dedup): so handing the
-- same attempt over twice queues it once. Its turn as in publish_fn.lua's enqueue().
-- KEYS: 1 arq's job record, 2 arq's result key, 3 the target set, 4 turns, 5 the turn
-- owner's line, 6 arq's queue, and 7 (optional) the outbox it leaves, when that is on
-- this Redis. ARGV: 1 payload, 2 px, 3 score ('' for a turn), 4 member, 5 priority
-- class, 6 turn slot, 7 the arq id. Returns 1 queued, 0 arq had it already.
-- The record goes last: a script that fails half way is not undone, and a record
-- without its place in the queue would pass for an attempt arq has.
-- The outbox entry goes last too: it is the sweeper's only trace of the attempt.
local function leave_outbox()
  if KEYS[7] then redis.call('ZREM', KEYS[7], ARGV[7]) end
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
