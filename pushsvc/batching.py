"""Calls of one Lua script made in the same turn of the event loop, sent to Redis
together: one pipeline, so one write and one read for all of them.

A worker's jobs flush on their own timers, and at load many flush in the same turn. Each
call on its own costs the worker a round trip (the loopback ``send(2)``, the reply's
wake-up, redis-py's connection checkout), most of a flush's CPU; batched, the round trip
is shared (BENCHMARKS.md, "One call a flush"). Each call stays what it was: its own
script run, its own reply or error. Calls of one job never share a batch (a job makes one
call at a time, ``JobContext.apply``), so the order of a job's events is unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError

from .data_plane import unsettled

Call = tuple[list[str], list[Any], asyncio.Future[Any]]
# What packing a call raises for an argument it cannot send (redis-py's DataError for a
# bool or None, a text hiredis and redis-py cannot encode): before any byte is written.
UNSENDABLE = (DataError, UnicodeError, TypeError)


class ScriptBatch:
    """``await batch(keys, args)``: the script's reply, as ``script(keys, args)`` gives it;
    the call goes out with the others made in the same turn of the loop."""

    def __init__(self, redis: Redis, script: AsyncScript) -> None:
        self._redis = redis
        self._script = script
        self._pending: list[Call] = []
        self._running: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append((keys, args, reply))
        return await reply

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Call]) -> None:
        try:
            replies = await self._execute(batch)
        except UNSENDABLE as exc:  # an argument no encoder takes: raised before anything
            if len(batch) == 1:  # was sent, so each call alone fails only the bad one
                _fail(batch, exc)
            else:
                await asyncio.gather(*(self._run([call]) for call in batch))
            return
        except Exception as exc:  # Redis unreachable, say: every call of it failed
            _fail(batch, exc)
            return
        except BaseException:
            _fail(batch, RedisConnectionError("stopped before Redis answered"))
            raise
        answered: list[tuple[Call, Any]] = []
        missing: list[Call] = []
        moving: list[Call] = []  # a slot moving, a failover
        for call, reply in zip(batch, replies, strict=True):
            if not isinstance(reply, Exception):  # nearly every reply: one test
                answered.append((call, reply))
            elif _no_script(reply):
                missing.append(call)
            elif unsettled(reply):
                moving.append(call)
            else:
                answered.append((call, reply))
        _answer(answered)
        if moving:  # each on its own, through the cluster client, which waits for it
            await asyncio.gather(*(self._alone(call) for call in moving))
        if missing:  # a Redis that restarted or was flushed: load it, send those again
            await self._again(missing)

    async def _alone(self, call: Call) -> None:
        keys, args, _ = call
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        try:
            try:
                result = await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoScriptError:  # the slot's new owner never had it: load, once more
                await self._redis.script_load(self._script.script)
                result = await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
        except Exception as exc:
            _fail([call], exc)
            return
        _answer([(call, result)])

    async def _again(self, missing: list[Call]) -> None:
        """Calls that found no script (and so did not run): once more, after loading it."""
        try:
            await self._redis.script_load(self._script.script)
            replies = await self._execute(missing)
        except Exception as exc:
            _fail(missing, exc)
            return
        except BaseException:
            _fail(missing, RedisConnectionError("stopped before Redis answered"))
            raise
        _answer(list(zip(missing, replies, strict=True)))

    async def _execute(self, batch: list[Call]) -> list[Any]:
        sha = self._script.sha
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)


def _no_script(reply: Any) -> bool:
    return isinstance(reply, NoScriptError)


def _answer(replies: list[tuple[Call, Any]]) -> None:
    for (_, _, future), reply in replies:
        if future.done():  # its caller gave up waiting; the call was made all the same
            continue
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)


def _fail(batch: list[Call], exc: Exception) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)
