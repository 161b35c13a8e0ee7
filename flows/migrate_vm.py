"""migrate-vm: validate → export → transfer → convert → register → report."""

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import FlowRun, State
from prefect.runtime import flow_run as current_run

from core.config import Config, config_from_env
from core.models import JobDefinition, MigrationResult
from core.paths import confine, safe_name
from tasks.convert import convert_disks
from tasks.export import ensure_export_limit, export_vm
from tasks.handoff import write_watch_manifest
from tasks.progress import LABEL, JobProgress
from tasks.register import register_domain
from tasks.transfer import transfer_files
from tasks.validate import validate_job

T = TypeVar("T")


def export_dir(job: JobDefinition, settings: Config) -> Path:
    """The job's export path, confined to export.base_path (default: base/<vm>)."""
    base = settings.export.base_path
    return confine(job.export_path or safe_name(job.vm_identifier), base, what="export_path")


def converts_in_flow(job: JobDefinition) -> bool:
    integration = job.hyper2kvm_integration
    return integration.enabled and integration.auto_convert and not integration.daemon_mode


def remove_partials(flow: Any, flow_run: FlowRun, state: State) -> None:
    """On cancel or crash: no half-written file stays where a finished one would be."""
    try:
        job = JobDefinition.model_validate(flow_run.parameters["job"])
        settings = config_from_env()
        folders = [export_dir(job, settings)]
        vm_name = (flow_run.labels or {}).get(f"{LABEL}vm")
        if vm_name:
            folders.append(settings.hyper2kvm.output_dir / safe_name(str(vm_name)))
    except Exception:  # noqa: BLE001 - a hook must never fail the state change
        return
    for folder in folders:
        for leftover in folder.glob(".*.partial") if folder.is_dir() else []:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _report(result: MigrationResult, job: JobDefinition, handoff: Path | None) -> str:
    vm = result.export.vm
    lines = [
        f"# Migration of `{vm.name}`",
        "",
        f"* Source: provider `{job.provider}`, VM `{job.vm_identifier}`, "
        f"{vm.cpus} vCPU, {vm.memory_mb} MiB, firmware {vm.firmware}",
        f"* Export: `{job.export_method}` into `{result.export.directory}`"
        f"{' (hard-linked)' if result.export.linked else ''}",
    ]
    if result.domain_name:
        lines.append(f"* libvirt domain: `{result.domain_name}` ({result.domain_uuid}) on "
                     f"`{result.libvirt_uri}`")
    if handoff:
        lines.append(f"* Handed to the hyper2kvm daemon: `{handoff}`")
    lines += ["", "| exported file | bytes | SHA-256 |", "|---|---:|---|"]
    lines += [f"| {f.path.name} | {f.size:,} | {f.sha256 or '-'} |" for f in result.export.files]
    if result.disks:
        lines += ["", "| disk | output | format | virtual bytes | on disk | seconds |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {d.source} | `{d.path}` | {d.format} | {d.virtual_size:,} | "
                  f"{d.actual_size:,} | {d.seconds} |" for d in result.disks]
    lines += ["", "| step | seconds |", "|---|---:|"]
    lines += [f"| {step} | {seconds} |" for step, seconds in result.step_seconds.items()]
    return "\n".join(lines)


@flow(
    name="migrate-vm",
    flow_run_name="migrate {job.vm_identifier}",
    persist_result=True,
    on_cancellation=[remove_partials],
    on_crashed=[remove_partials],
)
def migrate_vm(job: JobDefinition) -> MigrationResult:
    """Move one VM from its provider to a libvirt domain."""
    settings = config_from_env()
    logger = get_run_logger()
    progress = JobProgress.for_current_run(job.vm_identifier)
    steps: dict[str, float] = {}

    def timed(step: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return call()
        finally:
            steps[step] = round(time.monotonic() - started, 3)

    destination = export_dir(job, settings)
    timed("validate", lambda: validate_job(job, settings.hyper2kvm.output_dir,
                                           converts=converts_in_flow(job)))
    ensure_export_limit(settings.export.concurrent_exports)
    export = timed("export", lambda: export_vm.with_options(
        retries=settings.export.max_retries)(job, destination))
    result = MigrationResult(vm=export.vm.name, export=export)
    handoff: Path | None = None
    integration = job.hyper2kvm_integration
    if integration.enabled and integration.daemon_mode:
        handoff = timed("handoff", lambda: write_watch_manifest(
            job, export, settings.hyper2kvm, str(current_run.id)))
    elif converts_in_flow(job):
        h2k = settings.hyper2kvm
        staged = timed("transfer", lambda: transfer_files(export))
        disks = timed("convert", lambda: convert_disks(
            staged, h2k.output_dir, h2k.default_format, h2k.compression))
        registered = timed("register", lambda: register_domain(
            staged.vm, disks, h2k, autostart=integration.autostart,
            replace=integration.replace_existing))
        result = result.model_copy(update={
            "disks": disks, "domain_name": registered.name, "domain_uuid": registered.uuid,
            "libvirt_uri": registered.uri})
    result = result.model_copy(update={"step_seconds": steps})
    progress.complete()
    create_markdown_artifact(_report(result, job, handoff),
                             key=f"report-{progress.slug}",
                             description=f"Migration report for {export.vm.name}")
    logger.info("migration of %s finished: %s", job.vm_identifier,
                result.domain_name or handoff or destination)
    return result

