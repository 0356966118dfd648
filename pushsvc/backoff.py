"""How long every retry loop waits: redis-py's backoff policies, with a floor.

Each loop keeps its own numbers; the kinds are redis-py's ``redis.backoff`` classes,
plus ``SpreadBackoff`` (exponential, then a spread either side) for the client's polls.
"""

from __future__ import annotations

import random

from redis.backoff import (
    AbstractBackoff,
    EqualJitterBackoff,
    ExponentialBackoff,
    FullJitterBackoff,
)

__all__ = [
    "AbstractBackoff",
    "Delays",
    "EqualJitterBackoff",
    "ExponentialBackoff",
    "FullJitterBackoff",
    "SpreadBackoff",
    "floored",
    "jittered",
]


def floored(policy: AbstractBackoff, failures: int, floor: float | None = None) -> float:
    """``policy``'s wait after ``failures`` earlier failures, never below ``floor``
    (a server's ``Retry-After``)."""
    return max(floor or 0.0, policy.compute(failures))


def jittered(seconds: float) -> float:
    """Between half of ``seconds`` and all of it (equal jitter, no growth)."""
    return EqualJitterBackoff(cap=seconds, base=seconds).compute(0)


class SpreadBackoff(ExponentialBackoff):
    """Exponential backoff, then spread by ``spread`` either side (0.25: 75 % to 125 %)."""

    def __init__(self, cap: float, base: float, spread: float) -> None:
        super().__init__(cap, base)
        self._spread = spread

    def compute(self, failures: int) -> float:
        return super().compute(failures) * random.uniform(1 - self._spread, 1 + self._spread)


class Delays:
    """One retry loop's waits: :meth:`next` after each failure, :meth:`reset` after a
    success. (redis-py's ``Retry`` gives up after a count; these loops give up at a
    deadline, or never, and log between tries.)"""

    def __init__(self, policy: AbstractBackoff) -> None:
        self.policy = policy
        self.failures = 0  # since the last reset

    def next(self, floor: float | None = None) -> float:
        """The wait before the next try, never below ``floor``."""
        wait = floored(self.policy, self.failures, floor)
        self.failures += 1
        return wait

    def reset(self) -> None:
        self.failures = 0
