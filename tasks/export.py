"""The export step: the provider writes the VM under the job's export path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

# the lease-level calls under prefect.concurrency.sync.concurrency (pinned Prefect 3.9)
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.concurrency._sync import (
    acquire_concurrency_slots_with_lease,
    release_concurrency_slots_with_lease,
)
from prefect.exceptions import ObjectNotFound

from core.config import config_from_env
from core.errors import is_transient
from core.models import ExportResult, JobDefinition, VMInfo
from providers import get_provider
from providers.base import ExportMethod
from tasks.progress import LABEL, JobProgress, current_flow_run_id

EXPORT_LIMIT = "hypersdk-exports"


def ensure_export_limit(limit: int, *, update: bool = False) -> None:
    """Make sure the global concurrency limit exports take a slot of exists; with
    `update`, set its size to `limit` (the daemon does, from its config)."""
    with get_client(sync_client=True) as client:
        if update:
            client.upsert_global_concurrency_limit_by_name(EXPORT_LIMIT, limit)
            return
        try:
            client.read_global_concurrency_limit_by_name(EXPORT_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=EXPORT_LIMIT, limit=limit)
            )


LEASE_LABEL = "export_lease"  # the slot's lease id, in the flow run's labels
LEASE_SECONDS = 300


@contextmanager
def export_slot(progress: JobProgress) -> Iterator[None]:
    """One slot of the export limit, for as long as the export runs. Prefect's own
    `concurrency()` does the same, but keeps its lease id to itself: here it goes into the
    run's labels, so that when the run's process is killed its crash hook releases the slot
    at once (release_export_slot) instead of holding it until the lease expires."""
    lease = acquire_concurrency_slots_with_lease([EXPORT_LIMIT], 1, strict=True,
                                                 lease_duration=LEASE_SECONDS)
    progress.note(**{LEASE_LABEL: str(lease.lease_id)})
    try:
        with maintain_concurrency_lease(lease.lease_id, LEASE_SECONDS,
                                        raise_on_lease_renewal_failure=True):
            yield
    finally:
        release_concurrency_slots_with_lease(lease.lease_id)


def release_export_slot(flow_run_id: UUID) -> None:
    """Release the export slot a (crashed or cancelled) run's labels name, if it still
    holds it (releasing a released lease does nothing). The run is read afresh: the
    copy a crash hook is handed predates its labels."""
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(flow_run_id).labels or {}
        lease_id = labels.get(f"{LABEL}{LEASE_LABEL}")
        if lease_id:
            client.release_concurrency_slots_with_lease(UUID(str(lease_id)))


def only_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry a failed export only when the provider said the failure was transient."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as exc:  # noqa: BLE001 - we only classify it
            error = exc
    return error is not None and is_transient(error)


@task(name="export", persist_result=True, retry_condition_fn=only_transient,
      retry_delay_seconds=[2, 10, 30])
def export_vm(job: JobDefinition, export_path: Path, vm: VMInfo, *,
              converts: bool = False) -> ExportResult:
    """Export the VM from its provider into `export_path`; `vm` is what validation found
    (its disks size the progress without asking the provider again). A job that
    `converts` gets the disks unpackaged: an OVA it would not keep is not built."""
    settings = config_from_env()
    logger = get_run_logger()
    progress = JobProgress.for_current_run(job.vm_identifier)
    with (
        export_slot(progress),
        get_provider(job.provider, settings) as provider,
    ):
        progress.start("export", sum(d.capacity_bytes for d in vm.disks))
        method: ExportMethod = "disks" if converts else job.export_method
        logger.info("exporting %s from %s as %s into %s", vm.name, job.provider,
                    method, export_path)
        result = provider.export(
            job.vm_identifier, export_path, method=method, options=job.options,
            progress=progress.advance, job=str(current_flow_run_id()),
        )
    progress.finish()
    logger.info("exported %d file(s), %d bytes%s", len(result.files), result.total_bytes,
                " (hard-linked, no copy)" if result.linked else "")
    return result
