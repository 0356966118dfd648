"""Shared helpers for the issue-17 client spike."""

import subprocess
import time

import psutil
from redis.crc import key_slot

PORTS = range(7101, 7107)
LUA = """
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '1000', '*', 'm', ARGV[1])
return redis.call('SPUBLISH', ARGV[2], ARGV[1])
"""


def slots_by_port() -> dict[int, tuple[int, int]]:
    out = subprocess.run(["redis-cli", "-p", "7101", "cluster", "shards"], capture_output=True, text=True).stdout
    res, lines = {}, out.split("\n")
    # crude: use CLUSTER NODES instead
    out = subprocess.run(["redis-cli", "-p", "7101", "cluster", "nodes"], capture_output=True, text=True).stdout
    for ln in out.splitlines():
        f = ln.split()
        if "master" in f[2] and "fail" not in f[2] and len(f) > 8:
            port = int(f[1].split(":")[1].split("@")[0])
            for r in f[8:]:
                if r.startswith("["):
                    continue
                a, _, b = r.partition("-")
                res.setdefault(port, []).append((int(a), int(b or a)))
    return res


def owner(slot: int) -> int:
    for port, ranges in slots_by_port().items():
        if any(a <= slot <= b for a, b in ranges):
            return port
    raise LookupError(slot)


def tenants_per_shard(n: int) -> list[str]:
    """n tenant names per primary, all shards covered."""
    sp = slots_by_port()
    got: dict[int, list[str]] = {p: [] for p in sp}
    i = 0
    while any(len(v) < n for v in got.values()):
        t = f"t{i}"
        s = key_slot(("{" + t + "}").encode())
        for p, ranges in sp.items():
            if any(a <= s <= b for a, b in ranges) and len(got[p]) < n:
                got[p].append(t)
        i += 1
    return [t for v in got.values() for t in v]


def tcp_to_cluster() -> int:
    conns = psutil.Process().net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port in PORTS and c.status == "ESTABLISHED")


def tcp_detail() -> dict[int, int]:
    d: dict[int, int] = {}
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.raddr and c.raddr.port in PORTS and c.status == "ESTABLISHED":
            d[c.raddr.port] = d.get(c.raddr.port, 0) + 1
    return dict(sorted(d.items()))


class Meter:
    def __enter__(self):
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *a):
        self.cpu = time.process_time() - self.c0
        self.wall = time.perf_counter() - self.w0
