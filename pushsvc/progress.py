"""Honest progress for a streamed answer: its expected length from the recent answers
of the same job type and model, and the time left from the rate the text arrives at."""

from __future__ import annotations

import logging
import statistics
from collections import deque

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .keys import Keys

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # the usual estimate (OpenAI's tokenizer guide) when none is counted
HISTORY = 20  # answers remembered per job type and model
HISTORY_TTL_S = 7 * 86400  # a model nobody asked for a week is forgotten
FIRST_GUESS_TOKENS = 256  # with no history and no hint: a typical answer, not max_tokens
MIN_RATE_S = 0.3  # text over less time than this says nothing of the rate yet


class AnswerLengths:
    """The lengths (characters) of the last answers per job type and model.

    Kept in Redis, so every worker learns from all the others' answers and a fresh one
    starts from them; this process's own memory stands in while Redis does not answer.
    """

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._local: dict[tuple[str, str], deque[int]] = {}

    async def record(self, job_type: str, model: str, chars: int) -> None:
        self._local.setdefault((job_type, model), deque(maxlen=HISTORY)).append(chars)
        key = self._keys.answer_lengths(job_type, model)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lpush(key, chars)
                pipe.ltrim(key, 0, HISTORY - 1)
                pipe.expire(key, HISTORY_TTL_S)
                await pipe.execute()
        except RedisError as exc:  # a guess for later answers: not worth failing a job
            logger.warning("answer length not recorded: %s", exc)

    async def expected(
        self, job_type: str, model: str, hint_tokens: int | None, max_tokens: int
    ) -> float:
        """Characters the next answer is likely to have: the caller's hint, else the
        median of the recent answers, else a typical answer; never past ``max_tokens``."""
        limit = max_tokens * CHARS_PER_TOKEN
        if hint_tokens is not None:
            return float(min(limit, hint_tokens * CHARS_PER_TOKEN))
        seen = await self._recent(job_type, model)
        if seen:
            return float(min(limit, statistics.median(seen)))
        return float(min(limit, FIRST_GUESS_TOKENS * CHARS_PER_TOKEN))

    async def _recent(self, job_type: str, model: str) -> list[int]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lrange(self._keys.answer_lengths(job_type, model), 0, -1)
                (raw,) = await pipe.execute()
        except RedisError:
            return list(self._local.get((job_type, model), ()))
        return [int(x) for x in raw if x.isdigit()]


class Gauge:
    """Progress and ETA of one answer as its text arrives (characters, not chunks: a
    server may send a token or a sentence per chunk)."""

    def __init__(self, expected_chars: float) -> None:
        self.expected = max(1.0, expected_chars)
        self.got = 0
        self._first: tuple[float, int] | None = None  # when text began, and how much came

    def add(self, chars: int, now: float) -> tuple[float, float | None]:
        """(progress %, seconds left or None) after ``chars`` more arrived at ``now``."""
        self.got += chars
        if self._first is None:
            self._first = (now, self.got)
        # Longer than expected: the end is near, not past (never 100 before it is).
        expected = max(self.expected, self.got * 1.05)
        pct = min(99.0, 100.0 * self.got / expected)
        since, before = self._first
        if now - since < MIN_RATE_S:
            return pct, None
        rate = (self.got - before) / (now - since)
        return pct, (expected - self.got) / rate if rate > 0 else None
