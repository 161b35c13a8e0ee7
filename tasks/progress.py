"""Job progress, written where the API and the UI read it: flow-run labels (one call
answers percentage, phase, bytes, rate and ETA) and a progress artifact in the Prefect UI."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.events import emit_event

# Each phase's share of the whole job, in percent: the bytes-heavy steps get most.
PHASES: dict[str, tuple[float, float]] = {
    "validate": (0.0, 1.0),
    "export": (1.0, 40.0),
    "stream": (1.0, 80.0),  # export and conversion in one pass (tasks/stream.py)
    "precopy": (1.0, 60.0),  # a warm migration's copies (tasks/warm.py)
    "sync": (60.0, 70.0),
    "cutover": (70.0, 80.0),
    "transfer": (40.0, 45.0),
    "convert": (45.0, 80.0),
    "guest": (80.0, 93.0),
    "register": (93.0, 94.0),
    "boot": (94.0, 99.0),
    "completed": (100.0, 100.0),
}
EXPORTING = ("export", "stream")  # the phases that hold an export slot
LABEL = "hypersdk."
PROGRESS_EVENT = "hypersdk.job.progress"  # a Prefect event per update: the websocket's feed
MIN_INTERVAL = 0.5  # seconds between label updates while bytes flow
logger = logging.getLogger("hypersdk.progress")


def current_flow_run_id() -> UUID:
    context = get_run_context()
    task_run = getattr(context, "task_run", None)
    if task_run is not None and task_run.flow_run_id:
        return UUID(str(task_run.flow_run_id))
    return UUID(str(context.flow_run.id))  # type: ignore[union-attr]


class _LabelWriter(threading.Thread):
    """Sends the newest progress to Prefect off the job's thread: an embedded SQLite server
    answers 503 while busy and the client backs off for seconds, which must not stall
    the work. Only the latest values matter, so a newer update replaces a pending one."""

    def __init__(self, flow_run_id: UUID, artifact_id: UUID) -> None:
        super().__init__(name="progress-writer", daemon=True)
        self.flow_run_id = flow_run_id
        self.artifact_id = artifact_id
        self._client = get_client(sync_client=True)
        self._wake = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._busy = False

    def submit(self, labels: dict[str, Any]) -> None:
        with self._wake:
            self._pending = labels
            self._wake.notify()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything submitted has been sent."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while (self._pending is not None or self._busy) and time.monotonic() < deadline:
                self._wake.wait(0.05)

    def run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None:
                    self._wake.wait()
                labels, self._pending, self._busy = self._pending, None, True
            try:
                self._client.update_flow_run_labels(self.flow_run_id, labels)
                update_progress_artifact(self.artifact_id, labels[f"{LABEL}percentage"])
                emit_event(PROGRESS_EVENT,
                           resource={"prefect.resource.id":
                                     f"prefect.flow-run.{self.flow_run_id}"},
                           payload={key.removeprefix(LABEL): value
                                    for key, value in labels.items()})
            except Exception as exc:  # noqa: BLE001 - progress must never fail the job
                logger.warning("could not record progress: %s", exc)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()


class JobProgress:
    """Progress of one flow run; safe to advance from several threads."""

    _by_run: dict[UUID, JobProgress] = {}

    def __init__(self, flow_run_id: UUID, *, slug: str) -> None:
        self.flow_run_id = flow_run_id
        self.slug = slug
        self._lock = threading.Lock()
        artifact_id: UUID = create_progress_artifact(  # type: ignore[assignment]
            progress=0.0, key=f"migrate-{slug}", description="Migration progress"
        )
        self._writer = _LabelWriter(flow_run_id, artifact_id)
        self._writer.start()
        self.phase = "validate"
        self.done = 0
        self.total = 0
        self._started = time.monotonic()
        self._last_write = 0.0
        self._notes: dict[str, str] = {}
        self._fraction = 0.0

    @classmethod
    def for_current_run(cls, vm_name: str | None = None) -> JobProgress:
        """The progress of the running flow run, created on first use."""
        run_id = current_flow_run_id()
        if run_id not in cls._by_run:
            slug = re.sub(r"[^a-z0-9-]+", "-", (vm_name or "job").lower()).strip("-") or "job"
            cls._by_run[run_id] = cls(run_id, slug=slug)
        return cls._by_run[run_id]

    def start(self, phase: str, total_bytes: int) -> None:
        with self._lock:
            self.phase, self.done, self.total = phase, 0, max(0, total_bytes)
            self._fraction = 0.0
            self._notes[f"{LABEL}step"] = ""
            self._started = time.monotonic()
            self._write(force=True)

    def note(self, **facts: str) -> None:
        """Facts about the job kept with its progress (e.g. the VM's name)."""
        with self._lock:
            self._notes.update({f"{LABEL}{key}": value for key, value in facts.items()})
            self._write(force=True)

    def step(self, text: str, fraction: float) -> None:
        """Where a phase without bytes to count is (virt-v2v's stages, the boot check):
        `text` as the job's `step`, `fraction` of the phase done."""
        with self._lock:
            self._fraction = min(max(fraction, 0.0), 0.99)
            self._notes[f"{LABEL}step"] = text[:200]
            self._write(force=True)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            self._write(force=False)

    def finish(self) -> None:
        with self._lock:
            self.done = max(self.done, self.total)
            self._write(force=True, phase_done=True)

    def sent(self) -> None:
        """Block until every update so far reached Prefect (before the run pauses, so that
        whoever sees it waiting reads its progress as of then)."""
        self._writer.flush()

    def complete(self) -> None:
        """The whole job is done: 100%, and every update sent before the run ends."""
        with self._lock:
            self.phase, self.done, self.total = "completed", 0, 0
            self._notes[f"{LABEL}step"] = ""
            self._write(force=True, phase_done=True)
        self._writer.flush()

    def percentage(self, *, phase_done: bool = False) -> float:
        low, high = PHASES.get(self.phase, (0.0, 100.0))
        if phase_done:
            return high
        fraction = min(self.done / self.total, 0.99) if self.total else self._fraction
        return round(low + (high - low) * fraction, 2)

    def _write(self, *, force: bool, phase_done: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < MIN_INTERVAL:
            return
        self._last_write = now
        elapsed = max(now - self._started, 1e-6)
        rate = self.done / elapsed
        self._writer.submit({
            **self._notes,
            f"{LABEL}phase": self.phase,
            f"{LABEL}percentage": self.percentage(phase_done=phase_done),
            f"{LABEL}bytes_done": self.done,
            f"{LABEL}bytes_total": self.total,
            f"{LABEL}rate_bps": round(rate),
            f"{LABEL}phase_eta_seconds": (
                round((self.total - self.done) / rate, 1) if rate and self.total > self.done else 0
            ),
            f"{LABEL}updated_at": time.time(),
        })
