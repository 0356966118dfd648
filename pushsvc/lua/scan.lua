-- One batch of the tenant's job listing (listing.py): the index entries [offset, offset +
-- count) scored at most ARGV[2], newest first, each job checked by its status and type
-- alone, so a filter never reads a job's payload or output.
-- KEYS: 1 tenant index. ARGV: 1 job hash key prefix, 2 max score, 3 offset, 4 count,
-- 5 status ('' any), 6 type ('' any). Returns {entries scanned, {id, score, ...} of the
-- jobs that match, {ids of jobs gone (expired)}}.
-- (Job hash names are derived from ARGV: the tenant's prefix, so in the tenant's slot.)
local rows = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[2], '-inf', 'WITHSCORES',
  'LIMIT', ARGV[3], ARGV[4])
local matches, gone = {}, {}
for i = 1, #rows, 2 do
  local job = redis.call('HMGET', ARGV[1] .. rows[i], 'status', 'type')
  if not job[1] then
    gone[#gone + 1] = rows[i]
  elseif (ARGV[5] == '' or job[1] == ARGV[5]) and (ARGV[6] == '' or job[2] == ARGV[6]) then
    matches[#matches + 1] = rows[i]
    matches[#matches + 1] = rows[i + 1]
  end
end
return {#rows / 2, matches, gone}
