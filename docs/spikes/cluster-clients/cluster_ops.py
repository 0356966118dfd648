"""Cluster admin helpers for the slot-move / failover tests (redis-py standalone conns)."""

import subprocess
import time

import redis
from redis.crc import key_slot

from common import PORTS
import os

DATA = os.environ.get("SPIKE_DATA", "/tmp/pushsvc-spike17")  # cluster.sh's


def alive_port() -> int:
    for p in PORTS:
        try:
            redis.Redis(port=p, socket_timeout=0.3).ping()
            return p
        except redis.RedisError:
            continue
    raise RuntimeError("no node")


def nodes() -> list[dict]:
    out = subprocess.run(["redis-cli", "-p", str(alive_port()), "cluster", "nodes"], capture_output=True, text=True).stdout
    res = []
    for ln in out.splitlines():
        f = ln.split()
        res.append({"id": f[0], "port": int(f[1].split(":")[1].split("@")[0]), "flags": f[2], "slots": f[8:]})
    return res


def owner_port(slot: int) -> int:
    for n in nodes():
        if "master" in n["flags"] and "fail" not in n["flags"]:
            for r in n["slots"]:
                if r.startswith("["):
                    continue
                a, _, b = r.partition("-")
                if int(a) <= slot <= int(b or a):
                    return n["port"]
    raise LookupError(slot)


def node_id(port: int) -> str:
    return next(n["id"] for n in nodes() if n["port"] == port)


def migrate_slot(slot: int, dst_port: int) -> int:
    src_port = owner_port(slot)
    src, dst = redis.Redis(port=src_port), redis.Redis(port=dst_port)
    src_id, dst_id = node_id(src_port), node_id(dst_port)
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *keys)
    dst.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    src.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    for n in nodes():
        if "master" in n["flags"] and n["port"] not in (src_port, dst_port) and "fail" not in n["flags"]:
            redis.Redis(port=n["port"]).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    return src_port


def spublish(channel: str, msg: str) -> int:
    return redis.Redis(port=owner_port(key_slot(channel.encode())), socket_timeout=0.5).execute_command("SPUBLISH", channel, msg)


def shardnumsub(channel: str) -> int:
    r = redis.Redis(port=owner_port(key_slot(channel.encode())))
    res = r.execute_command("PUBSUB SHARDNUMSUB", channel)
    return res[0][1] if isinstance(res[0], tuple) else res[1]


def kill9(port: int) -> None:
    pid = int(open(f"{DATA}/{port}/pid").read())
    subprocess.run(["kill", "-9", str(pid)], check=True)


def restart(port: int) -> None:
    d = f"{DATA}/{port}"
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "2000", "--save", "",
                    "--appendonly", "no", "--daemonize", "yes", "--dir", d, "--pidfile", f"{d}/pid",
                    "--logfile", f"{d}/log"], check=True)


def wait_stable(timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        ns = nodes()
        if all("fail" not in n["flags"] for n in ns) and sum("master" in n["flags"] for n in ns) == 3:
            r = subprocess.run(["redis-cli", "-p", str(alive_port()), "cluster", "info"], capture_output=True, text=True)
            if "cluster_state:ok" in r.stdout:
                return
        time.sleep(0.2)
    raise TimeoutError("cluster not stable")
