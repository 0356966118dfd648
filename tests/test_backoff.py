"""The retry policies every loop uses (pushsvc/backoff.py): growth, caps, jitter ranges,
the Retry-After floor."""

from __future__ import annotations

import pytest

from pushsvc.backoff import (
    Delays,
    EqualJitterBackoff,
    ExponentialBackoff,
    FullJitterBackoff,
    SpreadBackoff,
    floored,
    jittered,
)

DRAWS = 200  # random waits drawn per check: every one must stay in its range


@pytest.mark.timeout(10)
def test_delays_double_to_the_cap_and_start_again_after_a_reset() -> None:
    delays = Delays(ExponentialBackoff(cap=1.0, base=0.05))
    assert [delays.next() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    delays.reset()
    assert delays.next() == 0.05


@pytest.mark.timeout(10)
def test_a_servers_retry_after_is_the_floor() -> None:
    assert floored(ExponentialBackoff(cap=8.0, base=0.5), 0, floor=3.0) == 3.0
    assert floored(ExponentialBackoff(cap=8.0, base=0.5), 4, floor=3.0) == 8.0
    assert floored(ExponentialBackoff(cap=8.0, base=0.5), 1, floor=None) == 1.0
    assert Delays(ExponentialBackoff(cap=8.0, base=0.5)).next(floor=2.5) == 2.5


@pytest.mark.timeout(10)
def test_jitter_stays_within_its_range() -> None:
    for _ in range(DRAWS):
        assert 0 <= FullJitterBackoff(cap=60.0, base=1.0).compute(3) <= 8.0
        assert 4.0 <= EqualJitterBackoff(cap=8.0, base=0.5).compute(4) <= 8.0
        assert 0.5 <= jittered(1.0) <= 1.0
        assert 0.75 * 4 <= SpreadBackoff(cap=10.0, base=1.0, spread=0.25).compute(2) <= 1.25 * 4
