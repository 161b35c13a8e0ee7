"""Following a job to its end: a live bar (phase, percent, bytes, rate, ETA) fed by the
daemon's websocket, or by polling /jobs/progress when the websocket cannot be had."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from hyperctl.client import Daemon

FINISHED = ("completed", "failed", "cancelled")
CHECK_EVERY = 5.0  # seconds: the job's status is read even when no event says it ended


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


class Bar:
    """The job's bar; `update` takes a progress message (websocket event or
    /jobs/progress answer)."""

    def __init__(self, console: Console, job_id: str, *, show: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<9}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[moved]}"), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=console, disable=not show, transient=False)
        self.task: TaskID = self.progress.add_task(job_id, total=100, phase="pending",
                                                   moved="", rate="")

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def update(self, message: dict[str, Any]) -> None:
        done, total = message.get("bytes_done") or 0, message.get("bytes_total") or 0
        rate = message.get("rate_bps") or 0
        percent = message.get("progress", message.get("percentage"))
        self.progress.update(
            self.task, completed=percent if percent is not None else None,
            phase=message.get("phase") or message.get("status") or "",
            moved=f"{_size(done)}/{_size(total)}" if total else "",
            rate=f"{_size(rate)}/s" if rate else "")


def _status(daemon: Daemon, job_id: str) -> str:
    return str(daemon.get("/jobs/query", job_id=job_id)["status"])


def _by_websocket(daemon: Daemon, job_id: str, bar: Bar) -> None:
    from websockets.sync.client import connect

    url = daemon.websocket_url(job_id=job_id)
    with connect(url, additional_headers=daemon.target.headers, open_timeout=10) as socket:
        if _status(daemon, job_id) in FINISHED:  # it ended before we were listening
            return
        checked = time.monotonic()
        while True:
            try:
                text = socket.recv(timeout=CHECK_EVERY)
            except TimeoutError:
                text = None
            if text is not None:
                message = json.loads(text)
                if message.get("type") == "snapshot":
                    for job in message.get("jobs", []):
                        if job.get("job_id") == job_id:
                            bar.update(job)
                elif message.get("job_id") == job_id:
                    bar.update(message)
                    if message.get("status") in FINISHED:
                        return
            if time.monotonic() - checked >= CHECK_EVERY:
                checked = time.monotonic()
                if _status(daemon, job_id) in FINISHED:
                    return


def _by_polling(daemon: Daemon, job_id: str, bar: Bar, interval: float = 1.0) -> None:
    while True:
        progress = daemon.get(f"/jobs/progress/{job_id}")
        bar.update(progress)
        if progress["status"] in FINISHED:
            return
        time.sleep(interval)


def follow(daemon: Daemon, job_id: str, console: Console, *, show: bool) -> dict[str, Any]:
    """Wait for the job to end, showing its bar when `show`; returns its final answer."""
    with Bar(console, job_id, show=show) as bar:
        try:
            _by_websocket(daemon, job_id, bar)
        except (OSError, TimeoutError, ImportError) as exc:
            if show:
                console.print(f"[dim]websocket unavailable ({exc}); polling instead[/dim]")
            _by_polling(daemon, job_id, bar)
        except Exception as exc:  # websockets' own errors (closed, handshake refused)
            if type(exc).__module__.split(".")[0] != "websockets":
                raise
            _by_polling(daemon, job_id, bar)
        info: dict[str, Any] = daemon.get("/jobs/query", job_id=job_id)
        if info["status"] == "completed":
            bar.update({"progress": 100, "phase": "completed"})
    return info
