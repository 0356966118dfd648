-- An attempt started (worker.py, after its start transition): it leaves its owner's
-- line, and its class's clock moves up to its turn (turns_fn.lua); and it counts in
-- this second's start counter (the start rate: line.py). arq keeps a started attempt
-- in its queue until it ends, so its turn (its score there) is still read here.
-- KEYS: 1 the classes' clocks, 2 arq's queue, 3 the owner's line, 4 the start counter.
-- ARGV: 1 its class, 2 its arq id, 3 the counter's TTL (s).
turn_started(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[3])
return 1
