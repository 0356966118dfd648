"""``pushsvc submit``: submit a job and, with ``--follow``, show it in the terminal (rich):
a progress bar, then the text as it streams, then how it ended. Built on
:class:`pushsvc.client.Client`; nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import json
import sys
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
        if self.text and not self.text.endswith("\n"):
            self._write("\n")

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()


async def _follow(client: Client, job: dict[str, Any], out: Console) -> str:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("[dim]{task.fields[note]}"),
    )
    status = job["status"]
    with Progress(*columns, console=out) as bar:
        task = bar.add_task(job["type"], total=100, note=status)
        pane = _TextPane(bar, out)
        async for event in client.follow(job["id"]):
            state = apply_event(job, event.kind, event.data)
            job, status = state, state["status"]
            pane.show(job.get("output") or "")
            eta = job.get("eta_s")
            note = job.get("stage") or status
            if status == "running" and eta:
                note = f"{note} · {eta:.0f}s left"
            bar.update(task, completed=job.get("progress") or 0, note=note)
        pane.end()
    _report_end(job, out)
    return str(status)


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
