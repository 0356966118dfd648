"""The ASGI application (pushsvc/app.py): CORS, off unless origins are configured."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from .conftest import ops_api
from .procs import RedisServer


@pytest.mark.parametrize("origins", ["", "https://app.example"])
async def test_cors_is_off_unless_origins_are_configured(
    redis_server: RedisServer, redis: Redis, origins: str
) -> None:
    async with ops_api(redis_server, redis, cors_origins=origins) as (client, env):
        resp = await client.http.options(
            "/v1/jobs",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        allowed = resp.headers.get("access-control-allow-origin")
        assert allowed == (origins or None)
