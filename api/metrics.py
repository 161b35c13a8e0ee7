"""Prometheus metrics of one hypervisord, from what it already follows: the job events its
EventHub makes of Prefect's event stream, the webhook dispatcher's attempts and outbox, the
websocket's clients and its own provider calls. A scrape reads memory and one indexed
count of the outbox; it never asks Prefect about jobs. Labels are few-valued (provider,
status, phase, step, kind, outcome), never a VM name or job id. With several daemons or
workers each exposes its own view.

Counters count what this daemon saw since it started (events it replays after a restart
included); gauges are the jobs it follows now."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api.events import BACKUP_FLOW, TERMINAL, JobEvent
from core import errors
from tasks.progress import EXPORTING

# seconds: a 10-second conversion to a 10-hour export of a large VM
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 36000)
MAX_FOLLOWED = 20000  # jobs followed at once, as the event hub remembers them
_EXCEPTION = re.compile(r"(?:^|exception: )([A-Z][A-Za-z]+):")


def error_kind(error: type[BaseException]) -> str:
    """not_found, auth_failed, transient, unsupported or other (a ProviderError)."""
    name = error.__name__ if issubclass(error, errors.ProviderError) and \
        error is not errors.ProviderError else "Other"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def provider_error_in(message: str | None) -> type[errors.ProviderError] | None:
    """The provider error a failed job's message names ("...exception: NotFound: ...")."""
    match = _EXCEPTION.search(message or "")
    found = getattr(errors, match.group(1), None) if match else None
    return found if isinstance(found, type) and issubclass(found, errors.ProviderError) \
        else None


@dataclass
class _Job:
    provider: str
    status: str = "pending"
    started: datetime | None = None
    phase: str | None = None
    rate: float = 0.0


class Metrics(Collector):
    """The registry /metrics renders; `on_event` is an EventHub listener."""

    def __init__(self, *, outbox_backlog: Callable[[], int],
                 websocket_clients: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._backlog = outbox_backlog
        self._clients = websocket_clients
        self._jobs: dict[str, _Job] = {}
        r = self.registry
        self.finished = Counter("hypersdk_jobs_finished", "Jobs that ended, by outcome",
                                ["provider", "status"], registry=r)
        self.duration = Histogram("hypersdk_job_duration_seconds",
                                  "Jobs from start to end, by outcome",
                                  ["provider", "status"], buckets=BUCKETS, registry=r)
        self.steps = Histogram("hypersdk_step_duration_seconds",
                               "Steps of completed jobs (validate, export, stream, transfer, "
                               "convert, guest, register, boot)",
                               ["provider", "step"], buckets=BUCKETS, registry=r)
        self.exported = Counter("hypersdk_exported_bytes", "Bytes completed jobs read from "
                                "the source platforms", ["provider"], registry=r)
        self.converted = Counter("hypersdk_converted_bytes", "Bytes of the KVM images "
                                 "completed jobs wrote (virtual size)", ["provider"], registry=r)
        self.deliveries = Counter("hypersdk_webhook_deliveries",
                                  "Webhook delivery attempts by outcome (delivered, retrying, "
                                  "failed: given up)", ["outcome"], registry=r)
        self.provider_errors = Counter("hypersdk_provider_errors",
                                       "Errors reported by source platforms: this daemon's "
                                       "calls and jobs that failed on one", ["provider", "kind"],
                                       registry=r)
        r.register(self)

    # -- what the daemon tells it ------------------------------------------------------

    async def on_event(self, event: JobEvent) -> None:
        job_id, name = event.get("job_id"), event.get("event")
        # a backup run is not a job: it starts its VMs' jobs, which are counted
        if event.get("type") != "job" or not job_id or event.get("flow") == BACKUP_FLOW:
            return
        provider = event.get("provider") or "unknown"
        job = self._jobs.get(job_id)
        if job is None and len(self._jobs) >= MAX_FOLLOWED:
            # runs deleted in Prefect never end: the oldest followed go first
            del self._jobs[next(iter(self._jobs))]
        if name == "job.created":
            self._jobs.setdefault(job_id, _Job(provider=provider))
        elif name == "job.started":  # also a warm job going on after a pause
            job = self._jobs.setdefault(job_id, _Job(provider=provider))
            job.status, job.started = "running", job.started or _when(event)
        elif name == "job.waiting":
            job = self._jobs.setdefault(job_id, _Job(provider=provider))
            job.status = "waiting"
        elif name == "job.progress":
            job = self._jobs.setdefault(job_id, _Job(provider=provider, status="running"))
            self._progress(job, event)
        elif name in TERMINAL:
            self._jobs.pop(job_id, None)
            self._finished(job or _Job(provider=provider), event)

    @staticmethod
    def _progress(job: _Job, event: JobEvent) -> None:
        job.phase = event.get("phase") or job.phase
        job.rate = float(event.get("rate_bps") or 0)

    def _moved(self, provider: str, result: dict[str, Any]) -> None:
        """A completed job's bytes, from its result: progress events are thinned out
        (a short phase may never show in them), the result is exact."""
        disks = sum(int(d.get("virtual_size") or 0) for d in result.get("disks") or [])
        export = result.get("export") or {}
        if export.get("streamed"):
            exported = disks
        elif export.get("linked"):
            exported = 0  # hard links: no byte was read
        else:
            exported = sum(int(f.get("size") or 0) for f in export.get("files") or [])
        self.exported.labels(provider).inc(exported)
        self.converted.labels(provider).inc(disks)

    def _finished(self, job: _Job, event: JobEvent) -> None:
        status = str(event.get("status") or "failed")
        provider = job.provider if job.provider != "unknown" else \
            event.get("provider") or "unknown"
        self.finished.labels(provider, status).inc()
        if job.started is not None:
            seconds = (_when(event) - job.started).total_seconds()
            self.duration.labels(provider, status).observe(max(seconds, 0.0))
        if status == "completed":
            result = event.get("result") or {}
            self._moved(provider, result)
            for step, seconds in (result.get("step_seconds") or {}).items():
                self.steps.labels(provider, step).observe(float(seconds))
        elif status == "failed":
            error = provider_error_in(event.get("error"))
            if error is not None:
                self.provider_errors.labels(provider, error_kind(error)).inc()

    def delivery(self, *, delivered: bool, retrying: bool) -> None:
        self.deliveries.labels("delivered" if delivered else
                               "retrying" if retrying else "failed").inc()

    @contextmanager
    def provider_call(self, provider: str) -> Iterator[None]:
        """Count the provider errors a call made by this daemon raises."""
        try:
            yield
        except errors.ProviderError as exc:
            self.provider_errors.labels(provider, error_kind(type(exc))).inc()
            raise

    # -- read at each scrape -----------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("hypersdk_jobs", "Jobs pending (queued), running, or waiting "
                                 "for their cutover (warm) now",
                                 labels=["status"])
        statuses = [job.status for job in self._jobs.values()]
        for status in ("pending", "running", "waiting"):
            jobs.add_metric([status], statuses.count(status))
        yield jobs
        running = [job for job in self._jobs.values() if job.status == "running"]
        yield GaugeMetricFamily("hypersdk_transfer_rate_bytes_per_second",
                                "Bytes per second the running jobs move now",
                                value=sum(job.rate for job in running))
        yield GaugeMetricFamily("hypersdk_export_slots_in_use",
                                "Exports running now (each holds a slot of "
                                "export.concurrent_exports)",
                                value=sum(1 for job in running if job.phase in EXPORTING))
        yield GaugeMetricFamily("hypersdk_webhook_outbox_backlog",
                                "Webhook deliveries waiting for their first or next attempt",
                                value=self._backlog())
        yield GaugeMetricFamily("hypersdk_websocket_clients", "Websocket clients connected",
                                value=self._clients())


def _when(event: JobEvent) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]))
