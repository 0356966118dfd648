-- Move due attempts from the delayed set into the arq queue, each at its owner's next
-- turn of its priority class (turns_fn.lua is prepended).
-- KEYS: 1 delayed set (members "<priority>|<arq id>|<turn owner>"), 2 arq queue, 3 the
-- classes' clocks. ARGV: 1 now (ms), 2 at most this many, 3 the prefix of a turn owner's
-- hash (Keys.tenant_turns), 4 the turn size when the owner's hash has none.
-- Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local class, arq_id, owner = member:match('^([^|]*)|([^|]+)|(.*)$')
  if not class then  -- queued before fair share: "<priority offset ms>|<arq id>"
    local offset
    offset, arq_id = member:match('^(%d+)|(.+)$')
    class = ({['0'] = 'low', ['1000000000000'] = 'normal'})[offset or ''] or 'high'
    owner = '*'
  end
  if arq_id then
    local owner_key = ARGV[3] .. owner
    local slot = redis.call('HGET', owner_key, 'slot') or ARGV[4]
    redis.call('ZADD', KEYS[2], turn_score(KEYS[3], KEYS[2], owner_key, class, slot), arq_id)
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
