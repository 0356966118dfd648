"""The event bus on a Redis Cluster: sharded pub/sub (``SSUBSCRIBE``) through valkey-glide.

A job's channel and its tenant's live in the tenant's slot (keys.py), and the publish
script ``SPUBLISH``es there (store.py), so each event travels only within the shard
that owns the slot. valkey-glide holds a connection to each node whatever the number of
channels, subscribes each channel on the shard that owns its slot, and subscribes again
by itself after a slot moves or a shard fails over (BENCHMARKS.md, "Choosing the Redis
Cluster client").

What it does not say is when messages were lost in between. Two things tell the
streams: each tenant's epoch, which changes when its shard restarts or fails over (the
publish script: a reset snapshot follows), and a ping this process sends itself each
second on a channel of each tenant it has subscribed (so through the same shard): a
ping that comes back after one that did not, or none for ``_LOST_AFTER_S``, tells that
tenant's streams to refill from the logs, as a reconnect does on one Redis. A stream
also reads the log when it sees a gap in a job's sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from glide import (
    AdvancedGlideClusterClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    GlideError,
    Logger,
    LogLevel,
    NodeAddress,
    ServerCredentials,
    TlsAdvancedConfiguration,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from .events import EventBus, _Channel
from .settings import Settings

logger = logging.getLogger(__name__)
_Config = GlideClusterClientConfiguration
_SHARDED = _Config.PubSubChannelModes.Sharded
_PING_S = 1.0
_LOST_AFTER_S = 3.0  # a tenant's ping unanswered this long: its streams refill


def _tls_config(settings: Settings) -> AdvancedGlideClusterClientConfiguration | None:
    """glide's TLS files, those of Settings.data_cluster_tls_context (glide checks each
    node's certificate and name itself; with no CA file, against the system's CAs)."""
    if not settings.data_cluster_tls:
        return None
    ca = settings.data_cluster_tls_ca_file
    tls = TlsAdvancedConfiguration(
        root_pem_cacerts=Path(ca).read_bytes() if ca else None,
        client_cert_path=settings.data_cluster_tls_cert_file or None,
        client_key_path=settings.data_cluster_tls_key_file or None,
    )
    return AdvancedGlideClusterClientConfiguration(tls_config=tls)


def _tag(channel: str) -> str:
    """The hash tag of a tenant's channel, braces included ('' for none)."""
    start = channel.find("{")
    end = channel.find("}", start + 1)
    return channel[start : end + 1] if start >= 0 and end > start else ""


class ShardedBus(EventBus):
    """:class:`EventBus` over valkey-glide's sharded subscriptions."""

    confirms_later = False  # a subscribe returns once confirmed

    def __init__(self, settings: Settings, on_event: Callable[[str], None] | None = None) -> None:
        super().__init__(settings, on_event)
        # glide's own log (unstructured, on stderr) warns of every redirect while a slot
        # moves; what matters reaches pushsvc's log as errors of the calls.
        Logger.set_logger_config(LogLevel.ERROR)
        self._glide: GlideClusterClient | None = None
        self._timeout_ms = int(settings.stream_subscribe_timeout_s * 1000)
        self._pings: dict[str, _Ping] = {}  # tenant tag -> its ping channel's state
        self._ping_tags: dict[str, str] = {}  # ping channel -> its tenant tag
        self._pinger: asyncio.Task[None] | None = None
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # channel -> lock, its users
        self._subscribing: dict[str, asyncio.Task[None]] = {}  # channel -> its subscribe
        self._mending: dict[str, asyncio.Task[None]] = {}  # tenant tag -> its re-subscribe
        self._closing = False  # no new re-subscribes once set

    async def __aenter__(self) -> ShardedBus:
        await super().__aenter__()
        self._pinger = asyncio.create_task(self._ping_loop(), name="pushsvc-bus-ping")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
        sending = [*self._subscribing.values(), *self._mending.values()]
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        await super().__aexit__(*exc)
        if self._glide is not None:
            with contextlib.suppress(Exception):
                await self._glide.close()
            self._glide = None

    async def _connect(self) -> None:
        """A new glide client (the first, or after the last one failed): every channel is
        subscribed on it, and the open streams refill from the logs."""
        addresses = [NodeAddress(h, p) for h, p in self.settings.data_cluster]
        subs = _Config.PubSubSubscriptions(
            channels_and_patterns={_Config.PubSubChannelModes.Sharded: set()},
            callback=None,
            context=None,
        )
        password = self.settings.data_cluster_password.get_secret_value()
        credentials = (
            ServerCredentials(password, self.settings.data_cluster_username or None)
            if password
            else None
        )
        try:
            config = _Config(
                addresses,
                use_tls=self.settings.data_cluster_tls,
                credentials=credentials,
                request_timeout=self._timeout_ms,
                pubsub_subscriptions=subs,
                advanced_config=_tls_config(self.settings),  # reads the CA file again
            )
            self._glide = await GlideClusterClient.create(config)
        except (GlideError, OSError) as exc:  # the base class's loop retries
            raise ConnectionError(f"the data cluster is unreachable ({exc})") from exc
        self._pings.clear()
        self._ping_tags.clear()
        for entry in self._channels.values():
            entry.unconfirm()  # confirmed on the old client: confirm again
        self.connected.set()
        if names := set(self._channels):  # every channel at once: one call, not one each
            try:
                await self._glide.ssubscribe(names, timeout_ms=self._timeout_ms)
            except (GlideError, TimeoutError) as exc:
                logger.warning("sharded subscribes not confirmed (%s)", exc)
            else:
                for name in names:
                    found = self._channels.get(name)
                    if found is not None and not found.confirmed.done():
                        found.confirmed.set_result(None)
        if self.reconnects:
            for queue in self._streams:
                queue.mark_resync()
        self.reconnects += 1

    async def _read(self) -> None:
        glide = self._glide
        assert glide is not None
        try:
            while True:
                msg = await glide.get_pubsub_message()
                channel = msg.channel.decode() if isinstance(msg.channel, bytes) else msg.channel
                data = msg.message if isinstance(msg.message, bytes) else msg.message.encode()
                tag = self._ping_tags.get(channel)
                if tag is not None:
                    if self._pings[tag].answered(int(data)):
                        self._trouble(tag)
                    continue
                self._route(channel, data)
        except GlideError as exc:  # the client is closed or broken: the loop makes another
            self._glide = None
            with contextlib.suppress(Exception):
                await glide.close()
            raise ConnectionError(f"the sharded pub/sub client failed ({exc})") from exc

    @contextlib.asynccontextmanager
    async def _serial(self, channel: str) -> AsyncIterator[None]:
        """One subscribe or unsubscribe of ``channel`` at a time, in the order asked: a
        stream's subscribe made while the last stream's unsubscribe is under way would
        be confirmed at once, then undone by it."""
        lock, users = self._locks.get(channel, (asyncio.Lock(), 0))
        self._locks[channel] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[channel]
            if users > 1:
                self._locks[channel] = (lock, users - 1)
            else:
                del self._locks[channel]

    async def _confirmed(self, channel: str, entry: _Channel) -> None:
        """Subscribes now (a stream's first wait, or its next after one that failed:
        glide's own retry is not reported), or waits for the next client to."""
        if entry.confirmed.done():
            return
        if self._glide is None:
            await self._wait_confirmed(entry)
            return
        # One subscribe at a time per channel, which all its waiting streams share: each
        # waits at most stream_subscribe_timeout_s, however many wait (they send
        # heartbeats in between, and time out their wait for Redis).
        sending = self._subscribing.get(channel)
        if sending is None or sending.done():
            sending = asyncio.create_task(self._send_subscribe(channel, entry))
            self._subscribing[channel] = sending
            sending.add_done_callback(lambda done: self._sent(channel, done))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.stream_subscribe_timeout_s):
                await asyncio.shield(sending)
        if not entry.confirmed.done():
            raise RedisConnectionError("sharded subscription not confirmed")

    def _sent(self, channel: str, done: asyncio.Task[None]) -> None:
        if self._subscribing.get(channel) is done:
            del self._subscribing[channel]

    async def _send_subscribe(self, channel: str, entry: _Channel) -> None:
        async with self._serial(channel):
            glide = self._glide
            if glide is None or self._channels.get(channel) is not entry:
                return  # the next client subscribes it; or its streams are gone
            if entry.confirmed.done():
                return  # by another stream of the channel, meanwhile
            try:
                await glide.ssubscribe({channel}, timeout_ms=self._timeout_ms)
            except (GlideError, TimeoutError) as exc:
                # glide keeps it among the channels it wants, and subscribes it when the
                # shard answers, unannounced: the stream's next wait asks again.
                logger.warning("sharded subscribe of %s not confirmed (%s)", channel, exc)
                return
            if self._channels.get(channel) is entry and not entry.confirmed.done():
                entry.confirmed.set_result(None)

    async def _send_unsubscribe(self, channel: str) -> None:
        async with self._serial(channel):
            if self._glide is None or channel in self._channels:
                return  # no client; or another stream wants it again: kept
            with contextlib.suppress(GlideError, TimeoutError):
                await self._glide.sunsubscribe({channel}, timeout_ms=self._timeout_ms)

    # -- knowing when messages were lost ----------------------------------------

    def _trouble(self, tag: str) -> None:
        """Messages of the tenant whose tag this is may have been lost (a ping lost or
        overdue, or one of its channels no longer subscribed): its streams read the logs
        now, and again once each of its channels is subscribed for sure. After a failover
        glide subscribes them again by itself, unannounced, one by one, and may do the
        tenant's ping channel well before its streams' channels: events published in
        between reach no stream, and nothing else would tell."""
        self._refill(tag)
        mending = self._mending.get(tag)
        if not self._closing and (mending is None or mending.done()):
            self._mending[tag] = asyncio.create_task(self._mend(tag), name="pushsvc-bus-mend")

    async def _mend(self, tag: str) -> None:
        """Subscribe each of the tenant's channels glide does not hold subscribed now,
        waiting for each to be confirmed, then refill the tenant's streams; again after a
        ping's time while the shard does not answer. A new client does the same for every
        channel itself (:meth:`_connect`)."""
        try:
            while (glide := self._glide) is not None and not self._closing:
                try:
                    state = await glide.get_subscriptions()  # no call to the cluster
                    actual = state.actual_subscriptions.get(_SHARDED, set())
                    missing = [n for n in self._channels if _tag(n) == tag and n not in actual]
                    for channel in missing:
                        async with self._serial(channel):
                            if channel in self._channels and glide is self._glide:
                                await glide.ssubscribe({channel}, timeout_ms=self._timeout_ms)
                except (GlideError, TimeoutError):
                    await asyncio.sleep(_PING_S)
                    continue
                if glide is self._glide:
                    self._refill(tag)
                return
        finally:
            if self._mending.get(tag) is asyncio.current_task():
                del self._mending[tag]

    def _unsubscribed(self, actual: set[str]) -> set[str]:
        """The tags of tenants with a channel confirmed once and not subscribed now."""
        return {
            _tag(name)
            for name, entry in self._channels.items()
            if name not in actual and entry.confirmed.done() and _tag(name)
        }

    def _refill(self, tag: str) -> None:
        """The streams of the tenant whose tag this is read what they missed from the logs."""
        for name, entry in self._channels.items():
            if _tag(name) == tag:
                for queue in entry.queues:
                    queue.mark_resync()
                for targets in entry.by_job.values():
                    for queue in targets:
                        queue.mark_resync()

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(_PING_S)
            if self._glide is None:
                continue
            try:
                await self._ping_all(self._glide)
            except Exception:  # the pinger lives on; each tenant's next ping tells
                logger.exception("the bus's pings failed")

    async def _ping_all(self, glide: GlideClusterClient) -> None:
        tags = {_tag(name) for name in self._channels} - {""}
        for tag in set(self._pings) - tags:
            gone = self._pings.pop(tag, None)
            if gone is None:
                continue  # a new client meanwhile cleared them
            self._ping_tags.pop(gone.channel, None)
            with contextlib.suppress(GlideError, TimeoutError):
                await glide.sunsubscribe({gone.channel}, timeout_ms=self._timeout_ms)
        for tag in tags:
            known = self._pings.get(tag)
            if known is None:
                ping = _Ping(f"{self.keys.ns}:{tag}:bus:{self._control.rsplit(':', 1)[-1]}")
                try:
                    await glide.ssubscribe({ping.channel}, timeout_ms=self._timeout_ms)
                except (GlideError, TimeoutError):
                    continue  # the next round tries again
                if glide is not self._glide:
                    return  # a new client meanwhile: the next round starts on it
                self._pings[tag] = ping
                self._ping_tags[ping.channel] = tag
            else:
                ping = known
            if ping.overdue():
                self._trouble(tag)
            number = ping.send()
            with contextlib.suppress(GlideError, TimeoutError):
                await glide.publish(str(number), ping.channel, sharded=True)
        try:  # what glide holds now (no call to the cluster)
            state = await glide.get_subscriptions()
        except GlideError:
            return
        actual = state.actual_subscriptions.get(_SHARDED, set())
        for tag in self._unsubscribed(actual) - self._mending.keys():
            self._trouble(tag)


class _Ping:
    """One tenant's ping channel: the pings sent, and whether they all came back."""

    __slots__ = ("channel", "_sent", "_back", "_since")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._sent = 0  # the number of the last ping sent
        self._back = 0  # the number of the last ping back
        self._since = time.monotonic()  # when the oldest unanswered ping went out

    def send(self) -> int:
        if self._back == self._sent:
            self._since = time.monotonic()
        self._sent += 1
        return self._sent

    def answered(self, number: int) -> bool:
        """Note ping ``number`` back; True when one before it never came (lost)."""
        lost = number > self._back + 1
        self._back = max(self._back, number)
        if self._back == self._sent:
            self._since = time.monotonic()
        return lost

    def overdue(self) -> bool:
        """Unanswered for ``_LOST_AFTER_S`` (noted once: the clock starts again)."""
        if self._back < self._sent and time.monotonic() - self._since >= _LOST_AFTER_S:
            self._since = time.monotonic()
            return True
        return False
