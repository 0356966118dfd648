"""Stream positions (pushsvc/epoch.py): parsing SSE ids, printing them back, comparing
by history, fresh epochs, and the store epoch the connect hook takes on a real Redis."""

from __future__ import annotations

import secrets

import pytest
from redis.asyncio import Redis

from pushsvc.epoch import StreamPosition, connect_hook, new_epoch
from pushsvc.keys import Keys

from .procs import RedisServer


@pytest.mark.timeout(10)
def test_a_position_parses_and_prints_back() -> None:
    assert StreamPosition.parse("12.ab12cd34") == StreamPosition(12, "ab12cd34")
    assert StreamPosition.parse("7") == StreamPosition(7, "")
    assert str(StreamPosition(12, "ab12cd34")) == "12.ab12cd34"
    assert str(StreamPosition(7)) == "7"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw", ["", "-1", "1.", "a.1", "1.ab-cd", "²", "３", "1 ", "1" * 19])
def test_anything_else_is_not_a_position(raw: str) -> None:
    assert StreamPosition.parse(raw) is None


@pytest.mark.timeout(10)
def test_only_a_position_of_the_same_epoch_or_none_compares_by_number() -> None:
    assert StreamPosition(3, "aaaa").same_history("aaaa")
    assert not StreamPosition(3, "aaaa").same_history("bbbb")
    assert StreamPosition(3).same_history("bbbb")  # an older client's plain integer id


@pytest.mark.timeout(10)
def test_new_epochs_are_short_hex_and_distinct() -> None:
    epochs = {new_epoch() for _ in range(1000)}
    assert len(epochs) == 1000
    assert all(len(e) == 8 and int(e, 16) >= 0 for e in epochs)


@pytest.mark.timeout(20)
async def test_connections_of_one_server_share_the_store_epoch(redis_server: RedisServer) -> None:
    namespace = f"e{secrets.token_hex(3)}"
    hook = connect_hook(namespace)
    seen = []
    for _ in range(2):
        client = Redis.from_url(redis_server.url, redis_connect_func=hook)
        await client.ping()
        seen.append(await client.hget(Keys(namespace).epoch, "id"))
        await client.aclose()
    assert seen[0] is not None and seen[0] == seen[1]
