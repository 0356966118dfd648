"""Out-of-process publisher: SPUBLISH to given channels straight at their owners (pipelined)."""

import sys
import threading

import redis
from redis.crc import key_slot

from common import owner

n_total, channels = int(sys.argv[1]), sys.argv[2:]
by_port: dict[int, list[str]] = {}
for ch in channels:
    by_port.setdefault(owner(key_slot(ch.encode())), []).append(ch)


def run(port: int, chans: list[str], n: int) -> None:
    r = redis.Redis(port=port)
    sent = 0
    while sent < n:
        p = r.pipeline(transaction=False)
        for _ in range(min(200, n - sent)):
            p.execute_command("SPUBLISH", chans[sent % len(chans)], "x" * 100)
            sent += 1
        p.execute()


per = n_total // len(by_port)
ts = [threading.Thread(target=run, args=(p, c, per)) for p, c in by_port.items()]
[t.start() for t in ts]
[t.join() for t in ts]
print(per * len(by_port))
