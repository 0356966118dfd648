-- An attempt started (worker.py, after its start transition): it leaves its owner's
-- line, and its class's clock moves up to its turn (turns_fn.lua). arq keeps a started
-- attempt in its queue until it ends, so its turn (its score there) is still read here.
-- KEYS: 1 the classes' clocks, 2 arq's queue, 3 the owner's line. ARGV: 1 its class,
-- 2 its arq id.
turn_started(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
return 1
