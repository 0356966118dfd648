-- A worker rewrites the job it runs when the store lost or rewound it (see publish_fn.lua;
-- KEYS[10]: the tenant's index). The fields, the whole output and a `snapshot` event
-- come from the worker; history restarts under a fresh epoch, with seqs beyond both
-- what is stored and what the worker saw. Refused ({0, status}) when the attempt is
-- no longer the worker's: the store is current (its `gen` is the store epoch) and
-- shows another attempt, another owner, or a state other than running.
local K_INDEX = KEYS[10]
local g = store_epoch()
local cur = redis.call('HMGET', K_JOB, 'status', 'arq_id', 'owner', 'gen', 'seq')
if cur[1] and cur[4] == g
    and not (cur[1] == 'running' and cur[2] == A_ARQ_ID and cur[3] == A_OWNER) then
  return {0, cur[1]}
end
local seq = math.max(tonumber(cur[5] or '0'), tonumber(A_KNOWN_SEQ))
redis.call('HSET', K_JOB, 'seq', seq)
-- The text is rewritten from what the worker knows was made: a call it sends again
-- after this (its reply was lost) is made again, not taken for made.
redis.call('HDEL', K_JOB, 'epoch', 'wcall')
redis.call('DEL', K_LOG)
local reply = apply()
redis.call('ZADD', K_INDEX, A_INDEX_SCORE, A_JOB_ID)
redis.call('EXPIRE', K_INDEX, A_TTL)
return reply
