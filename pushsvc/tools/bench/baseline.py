"""The peer ``pushsvc bench fanout --baseline broadcaster`` measures pushsvc against: the
SSE server a user would write with the Starlette authors' pub/sub library,
encode/broadcaster (its Redis backend), under sse-starlette's ``EventSourceResponse``.

It runs as its own uvicorn process (``python -m pushsvc.tools.bench.baseline --port N``,
with the stack's ``PUSHSVC_*`` environment) and subscribes each stream to its job's
channel, so pushsvc's own worker is its publisher. It forwards each published message as
it is, split once for the event's name and id: no ordering, resume or backpressure, which
is what the comparison is about. uvicorn runs as pushsvc's API does (server.py: httptools,
the same loop, keep-alive and send buffer; no access log, no WebSockets).
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from broadcaster import Broadcast
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ...auth import LOCAL_TENANT
from ...keys import Keys
from ...server import open_file_limit
from ...settings import Settings

# The first event of every stream, once it has subscribed: the bench counts a stream
# open when it arrives (pushsvc's streams start with their ``snapshot``).
SUBSCRIBED = ServerSentEvent("{}", event="subscribed")


async def job_events(broadcast: Broadcast, channel: str) -> AsyncIterator[ServerSentEvent]:
    """One stream: each message published on ``channel``
    (``"<tseq>.<tepoch> <seq>.<epoch> <kind> <job id> <json>"``, publish_fn.lua) as an
    event named ``kind`` with ``id: <seq>.<epoch>`` and the JSON as its data."""
    async with broadcast.subscribe(channel) as subscriber:
        yield SUBSCRIBED
        # broadcaster's own idiom; its __aiter__ is hinted Optional, and never yields None
        async for event in subscriber:  # type: ignore[union-attr]
            message: str = event.message  # type: ignore[union-attr]
            _tpos, pos, kind, _job_id, data = message.split(" ", 4)
            yield ServerSentEvent(data, event=kind, id=pos)


def build_app(settings: Settings) -> Starlette:
    """``GET /jobs/{job_id}/events`` and ``GET /readyz``, over one Broadcast."""
    broadcast = Broadcast(settings.redis_url)
    keys = Keys(settings.namespace)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with broadcast:
            yield

    async def events(request: Request) -> Response:
        # The one local tenant of the bench's server (no API keys).
        channel = keys.job_channel(LOCAL_TENANT, request.path_params["job_id"])
        return EventSourceResponse(job_events(broadcast, channel))

    async def ready(_request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [Route("/jobs/{job_id}/events", events), Route("/readyz", ready)]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(port: int, settings: Settings) -> None:
    """uvicorn on 127.0.0.1:``port`` as server.py runs pushsvc's API, its own
    connection limits aside (they cost nothing per event)."""
    open_file_limit()  # raised to the hard limit, as the API's
    config = uvicorn.Config(
        build_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        ws="none",
        timeout_keep_alive=settings.keep_alive_s,
    )
    sock = config.bind_socket()
    if settings.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    serve(port, Settings(**{"port": port}))


if __name__ == "__main__":
    main()
