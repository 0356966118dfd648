-- Move due attempts from the delayed set into the arq queue at their priority.
-- KEYS: 1 delayed set (members "<priority offset ms>|<arq id>"), 2 arq queue.
-- ARGV: 1 now (ms), 2 at most this many. Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local offset, arq_id = member:match('^(%d+)|(.+)$')
  redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) - tonumber(offset), arq_id)
  redis.call('ZREM', KEYS[1], member)
end
return #due
