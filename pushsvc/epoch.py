"""Stream positions and epochs: how a position says which history it belongs to.

A position is a sequence number *and* the epoch of that sequence (Centrifugo's offset +
epoch). An epoch is a random token that changes whenever the history behind a sequence
may have been lost, so a position from another epoch is never compared by its number.

- The store's epoch (``Keys.epoch``: ``id``, the Redis ``run`` id it was taken on, and
  when a process that knew the previous one saw it change, ``recovered_at``) is
  checked on every new connection, before any command: a Redis that restarted (from an
  older snapshot, or empty) or failed over to a replica has another run id, so the
  store gets a new epoch before anything is read or written there.
- The "run id" pushsvc notes for a server (:func:`server_run_id`) is its ``run_id``,
  until it is promoted from replica: then a digest of its ``run_id`` and its new
  replication ID. A server promoted again, after it followed another for a while, keeps
  its ``run_id``, but its data is then the other's, which may lack what was written
  while it followed (a failover back that lost writes). By its ``run_id`` alone it
  would pass for the server the epochs were taken on, and a worker's repair of the job
  it runs would be refused as if another attempt had taken the job over. (A primary
  never promoted keeps its ``run_id`` as its run id: its replication ID also changes
  when a first replica attaches, which loses nothing.) A connection notes it again
  before a publish call at most every ``RENOTE_S``, and reconnects when it changed
  (:func:`renote`): a promotion without a reconnection (``CLUSTER FAILOVER``) is then
  seen within that time.
- Each tenant keeps the store's epoch as its slot knows it (``Keys.tenant_epoch``, with
  the run id it was taken on): the publish script takes a new one when the run id the
  caller's connection check found is another (a restart or failover of the Redis that
  holds the slot; on a Redis Cluster, of that shard only), or when it is missing.
- Each job and each tenant sequence keeps its own epoch and the tenant's store epoch it
  was taken under (``gen``). The publish script gives a sequence a fresh epoch when it
  is created anew (expiry, an empty Redis) or when its ``gen`` is not that epoch.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

from .keys import Keys

# Take the store's epoch over when the server is not the one it was recorded on. A
# process that saw another epoch before (ARGV[3]) marks the new one as recovered, once:
# missing jobs may still be repaired for a while (store.recovering).
_ENSURE = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id or redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then
  id = ARGV[2]
  redis.call('HSET', KEYS[1], 'id', id, 'run', ARGV[1])
end
if ARGV[3] ~= '' and ARGV[3] ~= id and redis.call('HGET', KEYS[1], 'recovered') ~= id then
  redis.call('HSET', KEYS[1], 'recovered', id, 'recovered_at', redis.call('TIME')[1])
end
return id
"""
_RUN_ID = re.compile(rb"^run_id:([0-9a-f]+)", re.M)
_REPLID = re.compile(rb"^master_replid:([0-9a-f]+)", re.M)
_SECOND_OFFSET = re.compile(rb"^second_repl_offset:(-?[0-9]+)", re.M)
RENOTE_S = 1.0  # how long a connection's noted run id serves before it is asked again
# A position as an SSE id: "<seq>" or "<seq>.<epoch>", ASCII digits and letters only.
_POSITION = re.compile(r"([0-9]{1,18})(?:\.([0-9A-Za-z]{1,32}))?", re.ASCII)


def new_epoch() -> str:
    """A fresh epoch token: 8 hex digits, never reused by one sequence in practice."""
    return secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a stream stands: ``seq`` within ``epoch`` (``""``: a plain-integer id of an
    older client, compared by number only)."""

    seq: int
    epoch: str = ""

    def __str__(self) -> str:
        return f"{self.seq}.{self.epoch}" if self.epoch else str(self.seq)

    @classmethod
    def parse(cls, raw: str) -> StreamPosition | None:
        """``"12.ab12cd34"`` or ``"12"``; None when ``raw`` is neither."""
        found = _POSITION.fullmatch(raw)
        if found is None:  # ASCII only: "²".isdigit() and int("３") would take others
            return None
        return cls(int(found[1]), found[2] or "")

    def same_history(self, epoch: str) -> bool:
        """May this position be compared by number with a sequence of ``epoch``?"""
        return not self.epoch or self.epoch == epoch


# A command's stand-in for the run id of the Redis it reaches: the connection that sends
# it puts its server's in its place, once connected and checked (connections.py), so a
# publish call never carries the run id of another server (one that restarted or was
# failed over from while the call was laid out). Run ids are 40 hex digits; so is the
# stand-in (random: no payload holds it by chance), so the command's framing holds.
RUN_ID_MARK = secrets.token_hex(20).encode()
NO_RUN_ID = b"0" * 40  # a server whose INFO gave none


class EpochCheck:
    """The epoch check of one pool's connections (``on_connect``: redis-py's
    ``redis_connect_func``, which must be a coroutine function). Each connection keeps
    the run id of the server it reached (``pushsvc_run_id``), which takes the place of
    ``RUN_ID_MARK`` in what it sends; the publish script compares it with each tenant's
    epoch (lua/publish_fn.lua)."""

    def __init__(self, namespace: str) -> None:
        self.key = Keys(namespace).epoch
        self._seen = ""  # the store epoch this pool's connections last found

    async def on_connect(self, conn: Any) -> None:
        """The usual handshake, then the epoch check."""
        await conn.on_connect()
        run_id = await _note_run_id(conn)
        await conn.send_command("EVAL", _ENSURE, 1, self.key, run_id, new_epoch(), self._seen)
        try:
            current = await conn.read_response()
        except ResponseError as exc:  # a replica: a primary just demoted, or a wrong URL
            if not isinstance(exc, ReadOnlyError) and "READONLY" not in str(exc):
                raise  # (Redis 6 wraps a script's READONLY in a script error)
            where = f"{conn.host}:{conn.port}"
            raise RedisConnectionError(f"{where} is not the primary (now): {exc}") from exc
        self._seen = current.decode() if isinstance(current, bytes) else str(current)


class RunIdCheck:
    """The check of a Redis Cluster client's connections (data_plane.connect_data):
    each keeps the run id of the node it reached, as :class:`EpochCheck`'s do, for the
    publish script's check of each tenant's epoch. No store-wide epoch: a node holds only
    its own slots' keys, and each tenant's epoch is the one its slot knows."""

    async def on_connect(self, conn: Any) -> None:
        await conn.on_connect()
        await _note_run_id(conn)


async def _ask_run_id(conn: Any) -> str:
    """Ask ``conn``'s server for its run id (:func:`server_run_id`). Two sections, two
    commands in one round trip (``INFO`` takes several sections only from Redis 7)."""
    await conn.send_command("INFO", "server")
    await conn.send_command("INFO", "replication")
    server, replication = (
        _as_bytes(await conn.read_response()),
        _as_bytes(await conn.read_response()),
    )
    run_id, replid = _RUN_ID.search(server), _REPLID.search(replication)
    second = _SECOND_OFFSET.search(replication)
    return server_run_id(
        run_id.group(1).decode() if run_id else "",
        replid.group(1).decode() if replid else "",
        promoted=second is not None and int(second.group(1)) >= 0,
    )


async def _note_run_id(conn: Any) -> str:
    """Note ``conn``'s server's run id on it (``pushsvc_run_id``, and when:
    ``pushsvc_noted_at``); returns it."""
    noted = await _ask_run_id(conn)
    conn.pushsvc_run_id = noted.encode() if noted else NO_RUN_ID
    conn.pushsvc_noted_at = time.monotonic()
    return noted


async def renote(conn: Any) -> bool:
    """Before a publish call: is the run id ``conn`` noted still its server's? Asked at
    most every ``RENOTE_S`` (a connection that noted none is not asked). When it is not,
    the caller reconnects (the epoch check runs again)."""
    noted_at = getattr(conn, "pushsvc_noted_at", None)
    if noted_at is None or time.monotonic() - noted_at < RENOTE_S:
        return True
    try:
        now = await _ask_run_id(conn)
    except Exception:  # an answer may be left unread: the connection is not to be used
        await conn.disconnect(nowait=True)
        raise
    conn.pushsvc_noted_at = time.monotonic()
    return bool((now.encode() if now else NO_RUN_ID) == conn.pushsvc_run_id)


def _as_bytes(info: Any) -> bytes:
    return info if isinstance(info, bytes) else str(info).encode()


def server_run_id(run_id: str, replid: str, promoted: bool) -> str:
    """The run id pushsvc records epochs with: the server's ``run_id``, or, once it was
    promoted from replica (``promoted``: ``INFO replication`` gives a
    ``second_repl_offset``), a digest of it and the replication ID it took then, which
    every promotion renews (see the module's docstring). 40 hex digits either way (a
    ``run_id`` of another length is digested too: the stand-in it replaces in a packed
    command has 40); '' for a server that gives no run id."""
    if not run_id or (len(run_id) == 40 and not promoted):
        return run_id
    both = f"{run_id}:{replid}" if promoted else run_id
    return hashlib.sha1(both.encode(), usedforsecurity=False).hexdigest()


def run_id_arg(redis: Any) -> str | bytes:
    """What a publish call passes as the run id: ``RUN_ID_MARK`` when ``redis``'s
    connections note their server's (connections.make_pool, connect_data), '' (none: the
    epoch it finds stands) else."""
    checked = getattr(getattr(redis, "connection_pool", None), "epoch_check", None)
    if checked is None:
        checked = getattr(redis, "epoch_check", None)
    return RUN_ID_MARK if checked is not None else ""
