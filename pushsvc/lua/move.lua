-- Move due attempts from the delayed set into the arq queue, each at its owner's next
-- turn of its priority class (turns_fn.lua is prepended).
-- KEYS: 1 delayed set (members "<priority>|<arq id>|<turn owner>"), 2 arq queue, 3 the
-- classes' clocks. ARGV: 1 now (ms), 2 at most this many, 3 the prefix of a turn owner's
-- line (Keys.tenant_turns), 4 the turn size, 5.. "<owner>", "<turn size>" pairs (weights).
-- Returns how many moved.
local slots = {}
for i = 5, #ARGV, 2 do slots[ARGV[i]] = ARGV[i + 1] end
local function requeue(class, arq_id, owner)
  local score = turn_score(KEYS[3], KEYS[2], ARGV[3] .. owner, class, slots[owner] or ARGV[4],
    arq_id)
  redis.call('ZADD', KEYS[2], score, arq_id)
end

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local class, arq_id, owner = member:match('^([^|]*)|([^|]+)|(.*)$')
  if not class then  -- queued before fair share: "<priority offset ms>|<arq id>"
    local offset
    offset, arq_id = member:match('^(%d+)|(.+)$')
    class = ({['0'] = 'low', ['1000000000000'] = 'normal'})[offset or ''] or 'high'
    owner = '*'
  end
  if arq_id then requeue(class, arq_id, owner) end
  redis.call('ZREM', KEYS[1], member)
end
-- Attempts queued before fair share carry a time less a priority offset (a score above
-- any turn's): they take turns, else every turn given since would go first.
local now = tonumber(ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '(-1e14', '+inf', 'WITHSCORES', 'LIMIT', 0,
  ARGV[2])
for i = 1, #old, 2 do
  local late = now - tonumber(old[i + 1])
  local class = 'high'
  if late < 5e11 then class = 'low' elseif late < 1.5e12 then class = 'normal' end
  requeue(class, old[i], '*')
end
return #due
