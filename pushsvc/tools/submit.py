"""``pushsvc submit``: submit a job and, with ``--follow``, show it in the terminal (rich):
a progress bar, then the text as it streams, then how it ended; a queued job's place in
line, a wait in words ("provider rate limit, retrying in 12 s": the console's words,
web/page.js) and the model call's telemetry. Built on :class:`pushsvc.client.Client`;
nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from ..client import Client
from ..errors import ApiError
from ..job_view import apply_event


def submit_command(type_: str, payload: str, follow: bool, url: str, api_key: str | None) -> int:
    """``pushsvc submit``: print the job id; with ``follow``, its progress and text.

    Returns the exit code: 0 when the job was submitted (and, followed, completed).
    """
    err = Console(stderr=True)
    try:
        body = json.loads(payload)
    except ValueError as exc:
        err.print(f"[red]--payload is not JSON:[/] {exc}", highlight=False)
        return 2
    if not isinstance(body, dict):
        err.print("[red]--payload must be a JSON object[/]")
        return 2
    try:
        return asyncio.run(_submit(type_, body, follow, url, api_key))
    except KeyboardInterrupt:
        err.print("stopped following; the job goes on")
        return 130


async def _submit(
    type_: str, payload: dict[str, Any], follow: bool, url: str, api_key: str | None
) -> int:
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    async with Client(url, api_key) as client:
        try:
            job = await client.submit(type_, payload)
            print(job["id"], flush=True)  # plain: `id=$(pushsvc submit ...)` works
            if not follow:
                return 0
            status = await _follow(client, job, out)
        except ApiError as exc:
            err.print(f"[red]error:[/] {exc.message} ({exc.code})")
            if exc.details:
                err.print(json.dumps(exc.details, indent=2), markup=False)
            return 1
        except (httpx.HTTPError, ConnectionError) as exc:
            err.print(f"[red]cannot reach {url}:[/] {exc}")
            return 1
    return 0 if status == "completed" else 1


class _TextPane:
    """Writes streamed text as it arrives, once: the first text ends the progress bar's
    live display (a bar redrawn below half-written lines would break them), and the
    terminal wraps it."""

    def __init__(self, bar: Progress, console: Console) -> None:
        self.bar, self.console = bar, console
        self.text = ""  # everything written
        self.broken = False  # a line break was written after it (not part of the text)

    @property
    def started(self) -> bool:
        return bool(self.text)

    def show(self, output: str) -> None:
        if not output.startswith(self.text):  # a new attempt starts its text again
            self._write("\n")
            self.console.rule("output restarted", style="dim")
            self.text = ""
        if len(output) > len(self.text):
            if not self.text:
                self.bar.stop()
            self._write(output[len(self.text) :])
            self.text = output

    def end(self) -> None:
        self.break_line()

    def break_line(self) -> None:
        """End a half-written line, so what is printed next starts on its own."""
        if self.text and not self.text.endswith("\n") and not self.broken:
            self._write("\n")
            self.broken = True

    def _write(self, text: str) -> None:
        self.broken = False
        self.console.file.write(text)
        self.console.file.flush()


# ---- a job's wait, place in line and model call, in words (as web/page.js says them) ----


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 11th, 22nd..."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def wait_for(seconds: float) -> str:
    """A wait in whole seconds (rounded up), minutes past a minute: "12 s", "3 min"."""
    whole = max(1, math.ceil(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{round(whole / 60)} min"
    return f"{round(whole / 3600)} h"


def wait_words(waiting: dict[str, Any] | None, now: float) -> str:
    """Why a job is not moving, counting down to ``until``: "provider rate limit,
    retrying in 12 s" ("" when it is not waiting)."""
    if not waiting:
        return ""
    until = waiting.get("until")
    left = None if until is None else until - now

    def when(verb: str) -> str:
        if left is None:
            return ""
        return f"{verb} in {wait_for(left)}" if left >= 0.5 else f"{verb} now"

    def joined(what: str, verb: str) -> str:
        return ", ".join(part for part in (what, when(verb)) if part)

    reason = waiting.get("reason")
    if reason == "rate_limited":
        return joined("provider rate limit", "retrying")
    if reason == "model_limit":
        return joined("model limit", "starts")
    if reason == "tenant_limit":
        return joined("your running-job limit is reached", "starts")
    if reason == "backoff":
        return when("retrying") or "retrying soon"
    return joined(f"waiting ({reason})", "starts")


def line_words(position: int | None, starts_in_s: float | None) -> str:
    """A queued job's place in line: "3rd in line, starts in ~12 s"."""
    if position is None:
        return ""
    place = "next in line" if position == 1 else f"{ordinal(position)} in line"
    if starts_in_s is None:
        return place
    if starts_in_s < 0.5:
        return f"{place}, starts any moment"
    return f"{place}, starts in ~{wait_for(starts_in_s)}"


def llm_words(llm: dict[str, Any] | None) -> str:
    """The model call: "fake-1 · first token 0.42 s · 85 tok/s · 12 in + 120 out tokens ·
    $0.0012" (tokens "~" when estimated, cost only when its price is known)."""
    if not llm:
        return ""
    parts = [str(llm.get("model") or "model")]
    if isinstance(llm.get("ttft_s"), int | float):
        parts.append(f"first token {_duration(llm['ttft_s'])}")
    if isinstance(llm.get("tokens_per_s"), int | float):
        parts.append(f"{round(llm['tokens_per_s'])} tok/s")
    about = "~" if llm.get("estimated") else ""
    prompt, completion = llm.get("prompt_tokens"), llm.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        parts.append(f"{about}{prompt} in + {about}{completion} out tokens")
    elif isinstance(completion, int):
        parts.append(f"{about}{completion} tokens")
    cost = llm.get("cost_usd")
    if isinstance(cost, int | float):
        parts.append(f"${cost:.2g}" if cost < 0.01 else f"${cost:.2f}")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    """As web/page.js's ``seconds`` writes one under a minute: "420 ms", "2.35 s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def job_note(job: dict[str, Any], now: float, line_at: float) -> str:
    """The bar's note: why it waits, its place in line (counting down from ``line_at``,
    when it was told), or its stage and time left."""
    status = job["status"]
    if status in ("queued", "running") and job.get("waiting"):
        return wait_words(job["waiting"], now)
    if status == "queued" and job.get("queue_position") is not None:
        starts = job.get("starts_in_s")
        left = None if starts is None else starts - (now - line_at)
        return line_words(job["queue_position"], left)
    note = str(job.get("stage") or status)
    eta = job.get("eta_s")
    return f"{note} · {eta:.0f}s left" if status == "running" and eta else note


# ---- following ----


class _Follower:
    """What ``--follow`` shows of one job: the bar's note (redrawn each second, so waits
    count down between events), the text, and each new wait on a line of its own."""

    def __init__(self, job: dict[str, Any], bar: Progress, out: Console) -> None:
        self.job, self.bar, self.out = job, bar, out
        self.task = bar.add_task(job["type"], total=100, note=job["status"])
        self.pane = _TextPane(bar, out)
        self.line_at = time.time()  # when its place in line was last told
        self.said: str = ""  # the last wait said on a line of its own

    def apply(self, kind: str, data: dict[str, Any]) -> None:
        before = self.job
        self.job = apply_event(before, kind, data)
        if any(self.job.get(k) != before.get(k) for k in ("queue_position", "starts_in_s")):
            self.line_at = time.time()
        self.pane.show(self.job.get("output") or "")
        self._say_wait()
        self.redraw()

    def redraw(self) -> None:
        note = job_note(self.job, time.time(), self.line_at)
        self.bar.update(self.task, completed=self.job.get("progress") or 0, note=note)

    def _say_wait(self) -> None:
        """A new wait gets a line (the bar is gone once text streamed)."""
        waiting = self.job.get("waiting")
        key = json.dumps(waiting, sort_keys=True) if waiting else ""
        if key and key != self.said:
            self.pane.break_line()
            self.out.print(f"[yellow]{wait_words(waiting, time.time())}[/]", highlight=False)
        self.said = key


@contextlib.contextmanager
def _ticking(follower: _Follower) -> Iterator[None]:
    async def tick() -> None:
        while True:
            await asyncio.sleep(1)
            follower.redraw()

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()


async def _follow(client: Client, job: dict[str, Any], out: Console) -> str:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("[dim]{task.fields[note]}"),
    )
    with Progress(*columns, console=out) as bar:
        follower = _Follower(job, bar, out)
        with _ticking(follower):
            async for event in client.follow(job["id"]):
                follower.apply(event.kind, event.data)
        follower.pane.end()
    job = follower.job
    if job.get("llm"):
        out.print(f"[dim]{llm_words(job['llm'])}[/]", highlight=False)
    _report_end(job, out)
    return str(job["status"])


def _report_end(job: dict[str, Any], out: Console) -> None:
    status = job["status"]
    if status == "completed":
        result = job.get("result")
        if isinstance(result, dict) and result.get("text") and result["text"] == job.get("output"):
            result = {**result, "text": "(above)"}  # the text was printed as it came, once
        out.print(f"[green]completed[/] {json.dumps(result)}", highlight=False)
    elif status == "failed":
        error = job.get("error") or {}
        out.print(f"[red]failed:[/] {error.get('message')} ({error.get('code')})")
    else:
        out.print(f"[yellow]{status}[/]")
    sys.stdout.flush()
