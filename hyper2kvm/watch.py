"""The watch-directory daemon: jobs are JSON manifests dropped into a folder.

    <watch_dir>/<job>.json          new jobs (written atomically: only *.json is taken)
    <watch_dir>/processing/         claimed by a rename, so two daemons never share one
    <watch_dir>/done/               the manifest and <job>.result.json once converted
    <watch_dir>/failed/             the manifest and <job>.result.json with the error

A job in processing/ when the daemon starts was cut short (crash, kill, reboot): it runs
again, its half-written outputs are discarded first. A job in done/ never runs again.
The conversion itself is a callable handed in (the CLI hands a Prefect flow), so this
module needs no Prefect."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.errors import HypersdkError, is_transient
from core.models import WatchJob

logger = logging.getLogger("hyper2kvm.daemon")
Convert = Callable[[WatchJob], dict[str, Any]]


def write_json_atomically(path: Path, data: Any) -> None:
    """Readers of `*.json` never see it half-written: a dot-file renamed into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    os.replace(temporary, path)


def result_path(folder: Path, job_id: str) -> Path:
    return folder / f"{job_id}.result.json"


class WatchDirectory:
    """The folders of one watch directory and the moves between them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processing = root / "processing"
        self.done = root / "done"
        self.failed = root / "failed"
        for folder in (root, self.processing, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)

    def interrupted(self) -> list[Path]:
        """Jobs a previous run had claimed and not finished."""
        return sorted(self.processing.glob("*.json"))

    def claim_new(self) -> list[Path]:
        """Move every new manifest into processing/ (oldest first); a rename that fails
        means another daemon took it."""
        claimed = []
        candidates = [p for p in self.root.glob("*.json") if not p.name.startswith(".")]
        for manifest in sorted(candidates, key=lambda p: p.stat().st_mtime):
            target = self.processing / manifest.name
            try:
                os.rename(manifest, target)
            except FileNotFoundError:
                continue
            claimed.append(target)
        return claimed

    def finish(self, manifest: Path, job_id: str, result: dict[str, Any], *, ok: bool) -> Path:
        """Write the result beside the manifest in done/ or failed/, result first, so a
        manifest in done/ always has its result."""
        folder = self.done if ok else self.failed
        write_json_atomically(result_path(folder, job_id), result)
        os.replace(manifest, folder / manifest.name)
        return result_path(folder, job_id)


class WatchDaemon:
    """Runs the jobs of one watch directory, `workers` at a time."""

    def __init__(self, root: Path, convert: Convert, *, workers: int = 2, poll: float = 1.0,
                 retries: int = 2, retry_delay: float = 5.0) -> None:
        self.folders = WatchDirectory(root)
        self.convert = convert
        self.poll = poll
        self.retries = retries
        self.retry_delay = retry_delay
        self.stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._running: set[Future[None]] = set()

    def run(self) -> None:
        """Until stop(): resume interrupted jobs, then take new ones as they arrive."""
        resumed = self.folders.interrupted()
        if resumed:
            logger.info("resuming %d interrupted job(s)", len(resumed))
        self._submit(resumed)
        while not self.stopping.wait(self.poll):
            self._submit(self.folders.claim_new())
            self._running = {f for f in self._running if not f.done()}
        self._pool.shutdown(wait=True, cancel_futures=False)

    def stop(self) -> None:
        self.stopping.set()

    def _submit(self, manifests: list[Path]) -> None:
        for manifest in manifests:
            self._running.add(self._pool.submit(self._process, manifest))

    def _process(self, manifest: Path) -> None:
        started = time.time()
        try:
            job = WatchJob.model_validate_json(manifest.read_text())
        except (ValidationError, ValueError) as exc:
            reason = f"bad manifest {manifest.name}: {exc}".splitlines()[0]
            job_id = manifest.stem
            logger.error(reason)
            self.folders.finish(manifest, job_id, {"job_id": job_id, "status": "failed",
                                                   "error": str(exc)}, ok=False)
            return
        attempt = 0
        while True:
            attempt += 1
            logger.info("job %s: converting %s (attempt %d)", job.job_id, job.source_path,
                        attempt)
            try:
                result = self.convert(job)
            except Exception as exc:  # noqa: BLE001 - every failure is reported in failed/
                if is_transient(exc) and attempt <= self.retries and not self.stopping.is_set():
                    logger.warning("job %s: transient failure, retrying: %s", job.job_id, exc)
                    time.sleep(self.retry_delay)
                    continue
                error = (str(exc) if isinstance(exc, HypersdkError)
                         else f"{type(exc).__name__}: {exc}")
                logger.error("job %s failed: %s", job.job_id, error)
                self.folders.finish(manifest, job.job_id, {
                    "job_id": job.job_id, "status": "failed", "error": error,
                    "attempts": attempt, "seconds": round(time.time() - started, 3)}, ok=False)
                return
            self.folders.finish(manifest, job.job_id, {
                "job_id": job.job_id, "status": "completed", "attempts": attempt,
                "seconds": round(time.time() - started, 3), "result": result}, ok=True)
            logger.info("job %s done", job.job_id)
            return
