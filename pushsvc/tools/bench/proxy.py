"""TCP proxies in a child process, for :mod:`sentinel`: each forwards to one
Redis server and can hold back replication links (a client that sent ``REPLCONF``), so
a replica misses writes while its link stays up. Run as ``python -m pushsvc.tools.bench.proxy
<port>...``; it answers "pause <i>" / "resume <i>" lines on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from .stack import BenchError

# -- the proxies (the child process's side) -------------------------------------------


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.writers = writers
        self.replication = False  # its client sent REPLCONF: a replica's link
        self.asked = 0  # chunks the client sent (REPLCONF comes in the handshake)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for writer in self.writers:
            writer.transport.abort()  # the other direction's read ends too


class _Proxy:
    """Forwards every connection to ``target``; :meth:`pause` holds replication links."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.links: set[_Link] = set()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()  # the server is down: so is this connection
            return
        link = _Link((writer, up_writer))
        self.links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, link, asks=True),
                self._pump(up_reader, writer, link, asks=False),
            )
        finally:
            self.links.discard(link)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, asks: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if asks and link.asked < 8:
                    link.asked += 1
                    link.replication |= b"REPLCONF" in data[:64]
                if link.replication:
                    await self.flowing.wait()
                if link.closed:
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            link.close()

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        """Cut the replication links (what a pause held back is dropped, never sent);
        links made from now on flow."""
        for link in list(self.links):
            if link.replication:
                link.close()
        self.flowing.set()


async def _serve(targets: list[int]) -> None:
    proxies = [_Proxy(t) for t in targets]
    servers = [await asyncio.start_server(p.accept, "127.0.0.1", 0) for p in proxies]
    print("ports", *(s.sockets[0].getsockname()[1] for s in servers), flush=True)
    commands = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    while line := await commands.readline():  # "pause <i>" or "resume <i>"; EOF: stop
        verb, index = line.decode().split()
        getattr(proxies[int(index)], verb)()
        print("ok", verb, index, flush=True)


# -- the proxies (the parent's side) ----------------------------------------------------


class Proxies:
    """A child process with one proxy per target port (:attr:`ports`, in order)."""

    def __init__(self, targets: list[int], log: Path) -> None:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pushsvc.tools.bench.proxy", *map(str, targets)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
            )
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().decode()  # "ports <p>...", or "": it died
        self.ports = [int(p) for p in first.split()[1:]]
        if len(self.ports) != len(targets):
            self.close()
            raise BenchError(f"the proxies did not start: {log.read_text(errors='replace')}")

    def _tell(self, verb: str, index: int) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None and self.proc.stdout is not None
        with self._lock:
            try:
                stdin.write(f"{verb} {index}\n".encode())
                stdin.flush()
            except OSError:
                pass  # the process is gone: the answer says so
            answer = self.proc.stdout.readline().decode()
        if not answer.startswith("ok"):
            raise BenchError(f"the proxies did not {verb} (exit {self.proc.poll()})")

    def pause(self, index: int) -> None:
        """From now on replication links through proxy ``index`` pass nothing."""
        self._tell("pause", index)

    def resume(self, index: int) -> None:
        self._tell("resume", index)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the process stops at EOF
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    asyncio.run(_serve([int(p) for p in sys.argv[1:]]))
