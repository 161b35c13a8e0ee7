"""Hand-off to a hyper2kvm watch-directory daemon: a job manifest dropped into its watch
directory, then its result awaited."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from core.config import Hyper2kvmConfig
from core.errors import ConversionError
from core.models import ExportResult, GuestOptions, JobDefinition, MigrationResult, WatchJob
from hyper2kvm.watch import WatchDirectory, result_path, write_json_atomically
from tasks.guest import resolved
from tasks.progress import JobProgress


def primary_file(export: ExportResult) -> Path:
    """What the daemon converts: the OVA, else the OVF descriptor, else the first disk."""
    for role in ("ova", "ovf", "disk"):
        found = next((f.path for f in export.files if f.role == role), None)
        if found:
            return found
    raise ConversionError(f"{export.vm.name}: the export holds nothing to convert")


@task(name="handoff", persist_result=True)
def write_watch_manifest(
    job: JobDefinition, export: ExportResult, settings: Hyper2kvmConfig, job_id: str
) -> Path:
    """Write `<watch_dir>/<instance>/<job_id>.json` atomically: the daemon only ever takes
    `*.json`, so it never sees a half-written manifest."""
    folder = WatchDirectory(settings.watch_dir / job.hyper2kvm_integration.instance).root
    integration = job.hyper2kvm_integration
    manifest = WatchJob(
        job_id=job_id, source_path=str(primary_file(export)), import_to_kvm=True,
        autostart=integration.autostart, replace=integration.replace_existing,
        **resolved(integration, settings).model_dump(include=set(GuestOptions.model_fields)))
    target = folder / f"{job_id}.json"
    write_json_atomically(target, manifest.model_dump(mode="json"))
    get_run_logger().info("handed %s to the hyper2kvm daemon: %s", export.vm.name, target)
    return target


@task(name="await-daemon")
def await_daemon(manifest: Path, job_id: str, settings: Hyper2kvmConfig) -> MigrationResult:
    """Wait (polling every hyper2kvm.poll_interval, at most hyper2kvm.job_timeout) for the
    daemon's result; its failure is this job's failure."""
    folders = WatchDirectory(manifest.parent)
    progress = JobProgress.for_current_run()
    progress.start("convert", 0)
    deadline = time.monotonic() + settings.job_timeout
    while time.monotonic() < deadline:
        for folder, ok in ((folders.done, True), (folders.failed, False)):
            found = result_path(folder, job_id)
            if found.exists():
                outcome = json.loads(found.read_text())
                if not ok:
                    raise ConversionError(f"the hyper2kvm daemon failed: {outcome['error']}")
                progress.finish()
                get_run_logger().info("the hyper2kvm daemon finished %s in %.1fs", job_id,
                                      outcome.get("seconds", 0.0))
                return MigrationResult.model_validate(outcome["result"])
        time.sleep(settings.poll_interval)
    raise ConversionError(
        f"no result from the hyper2kvm daemon for {manifest} after {settings.job_timeout:.0f}s;"
        f" is hyper2kvm@{manifest.parent.name} running?")
