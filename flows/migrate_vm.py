"""migrate-vm: validate → export → transfer → convert → guest → register → boot check →
report."""

import contextlib
import logging
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.objects import FlowRun, State
from prefect.runtime import flow_run as current_run

from core.config import Config, config_from_env
from core.files import remove_partials
from core.models import ExportResult, JobDefinition, MigrationResult, VMInfo
from core.paths import confine, safe_name
from core.process import exit_with_daemon
from flows.bootable import make_bootable
from flows.report import StepTimer, publish_report
from hyper2kvm.boot import stop_boot_check
from hyper2kvm.convert import changed_outputs
from hyper2kvm.staging import StagedVM
from providers import get_provider
from providers.base import streams as provider_streams
from tasks.convert import convert_disks
from tasks.export import ensure_export_limit, export_vm, release_export_slot
from tasks.handoff import await_daemon, write_watch_manifest
from tasks.progress import LABEL, JobProgress
from tasks.reuse import proven
from tasks.stream import stream_vm, streamed_disks_changed
from tasks.transfer import transfer_files
from tasks.validate import check_this_host, validate_job
from tasks.warm import commit_warm, copy_warm
from tasks.waves import wait_for_upstream

hook_log = logging.getLogger("hypersdk.cleanup")


def export_dir(job: JobDefinition, settings: Config) -> Path:
    """The job's export path, confined to export.base_path (default: base/<vm>)."""
    base = settings.export.base_path
    return confine(job.export_path or safe_name(job.vm_identifier), base, what="export_path")


def converts_in_flow(job: JobDefinition) -> bool:
    integration = job.hyper2kvm_integration
    return integration.enabled and integration.auto_convert and not integration.daemon_mode


def streams_in_flow(job: JobDefinition, settings: Config) -> bool:
    """Whether the job tries the one-pass path: its provider has one, it converts, keeps
    no export, and wants no compressed qcow2 (qemu-nbd writes clusters uncompressed)."""
    return (converts_in_flow(job) and not job.options.keep_export
            and not settings.hyper2kvm.compression and provider_streams(job.provider))


def discard_exports(job: JobDefinition, settings: Config, job_id: str) -> None:
    """What the run's export made in the source account (snapshots, export objects)
    and could not remove itself, removed now."""
    try:
        with get_provider(job.provider, settings) as provider:
            removed = provider.discard(job_id)
        if removed:
            hook_log.info("job %s: removed %s from %s", job_id, ", ".join(removed),
                          job.provider)
    except Exception as exc:  # noqa: BLE001 - a hook must never fail the state change
        hook_log.warning("job %s: could not remove its export leftovers from %s: %s",
                         job_id, job.provider, exc)


def clean_up_after(flow: Any, flow_run: FlowRun, state: State) -> None:
    """On cancel or crash (a hook: the run's process may be gone): see `clean_up_run`."""
    clean_up_run(flow_run.id)


def clean_up_run(flow_run_id: UUID) -> None:
    """No half-written file stays where a finished one would be (nor what a transient
    failure kept for a retry that will not come: partial files, snapshots), and an export
    slot the run held is free at once. The run is read afresh: a hook's copy of it
    predates its labels."""
    with contextlib.suppress(Exception):  # a hook must never fail the state change
        release_export_slot(flow_run_id)
    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
        job = JobDefinition.model_validate(flow_run.parameters["job"])
        settings = config_from_env()
        discard_exports(job, settings, str(flow_run_id))
        folders = [export_dir(job, settings)]
        vm_name = (flow_run.labels or {}).get(f"{LABEL}vm")
        if vm_name:
            folders.append(settings.hyper2kvm.output_dir / safe_name(str(vm_name)))
            with contextlib.suppress(Exception):
                stop_boot_check(settings.hyper2kvm.libvirt_uri, safe_name(str(vm_name)))
    except Exception:  # noqa: BLE001 - a hook must never fail the state change
        return
    for folder in folders:
        remove_partials(folder)


@flow(
    name="migrate-vm",
    flow_run_name="migrate {job.vm_identifier}",
    persist_result=True,
    on_cancellation=[clean_up_after],
    on_crashed=[clean_up_after],
)
def migrate_vm(job: JobDefinition) -> MigrationResult:
    """Move one VM from its provider to a libvirt domain."""
    exit_with_daemon()  # a SIGKILLed hypervisord leaves no run behind
    try:
        return migrate(job)
    except Exception:
        # before the run turns Failed (an on_failure hook runs after): whoever sees the
        # job failed finds nothing of it left behind
        clean_up_run(UUID(str(current_run.id)))
        raise


def migrate(job: JobDefinition) -> MigrationResult:
    """The flow's steps."""
    settings = config_from_env()
    progress = JobProgress.for_current_run(job.vm_identifier)
    timed = StepTimer()
    destination = export_dir(job, settings)
    check_this_host(settings, provider=job.provider, converts=converts_in_flow(job))
    vm = timed("validate", lambda: validate_job(job, converts=converts_in_flow(job)))
    if job.after and not job.options.warm:  # a warm job waits before its cutover
        wait_for_upstream(job.after, progress=progress)
    ensure_export_limit(settings.export.concurrent_exports)
    integration = job.hyper2kvm_integration
    h2k = settings.hyper2kvm
    output_format = integration.format or h2k.default_format
    handoff: Path | None = None
    streamed = None
    if job.options.warm:
        return migrate_warm(job, vm, settings, timed=timed, progress=progress)
    if streams_in_flow(job, settings):
        streamed = timed("stream", lambda: proven(
            streamed_disks_changed, stream_vm.with_options(retries=settings.export.max_retries),
            job, vm, h2k.output_dir / safe_name(vm.name), output_format))
    if streamed is not None:
        export = ExportResult(vm=streamed.vm, directory=destination, files=[],
                              method="disks", streamed=True)
        result = MigrationResult(vm=export.vm.name, export=export, disks=streamed.disks)
        result = result.model_copy(update=make_bootable(
            streamed.vm, streamed.disks, h2k, integration, register=True,
            autostart=integration.autostart, replace=integration.replace_existing,
            timed=timed))
    else:
        # an export to keep is packaged as export_method asks; else only what converts
        export = timed("export", lambda: proven(
            ExportResult.missing, export_vm.with_options(retries=settings.export.max_retries),
            job, destination, vm, converts=converts_in_flow(job) and not job.options.keep_export))
        result = MigrationResult(vm=export.vm.name, export=export)
        if integration.enabled and integration.daemon_mode:
            job_id = str(current_run.id)
            handoff = timed("handoff", lambda: write_watch_manifest(
                job, export, settings.hyper2kvm, job_id))
            converted = timed("convert", lambda: await_daemon(handoff, job_id, h2k))
            result = result.model_copy(update={field: getattr(converted, field) for field in (
                "disks", "domain_name", "domain_uuid", "libvirt_uri", "storage_pool", "guest",
                "boot", "warnings")})
        elif converts_in_flow(job):
            staged = timed("transfer", lambda: proven(
                StagedVM.missing, transfer_files, export, settings.source_roots()))
            disks = timed("convert", lambda: proven(
                changed_outputs, convert_disks, staged,
                h2k.output_dir / safe_name(staged.vm.name), output_format, h2k.compression))
            result = result.model_copy(update={"disks": disks, **make_bootable(
                staged.vm, disks, h2k, integration, register=True,
                autostart=integration.autostart, replace=integration.replace_existing,
                timed=timed)})
    return finish(job, result, timed=timed, progress=progress, handoff=handoff)


def migrate_warm(job: JobDefinition, vm: VMInfo, settings: Config, *, timed: StepTimer,
                 progress: JobProgress) -> MigrationResult:
    """Copied while the VM runs, until the cutover (tasks/warm.py); then converted and
    defined like a streamed VM. Downtime: the last round's start to the domain defined
    (and booted, with verify_boot)."""
    h2k, integration = settings.hyper2kvm, job.hyper2kvm_integration
    output_format = integration.format or h2k.default_format
    folder = h2k.output_dir / safe_name(vm.name)
    report = timed("warm", lambda: copy_warm(job, vm, folder, output_format))
    copied = time.monotonic()
    disks = commit_warm(vm, folder, output_format, report)
    export = ExportResult(vm=vm, directory=export_dir(job, settings), files=[],
                          method="disks", streamed=True)
    result = MigrationResult(vm=vm.name, export=export, disks=disks)
    result = result.model_copy(update=make_bootable(
        vm, disks, h2k, integration, register=True, autostart=integration.autostart,
        replace=integration.replace_existing, timed=timed))
    report.downtime_seconds = round(report.rounds[-1].seconds + time.monotonic() - copied, 3)
    get_run_logger().info("%s cut over: %.1f s of downtime", vm.name, report.downtime_seconds)
    return finish(job, result.model_copy(update={"warm": report}), timed=timed,
                  progress=progress, handoff=None)


def finish(job: JobDefinition, result: MigrationResult, *, timed: StepTimer,
           progress: JobProgress, handoff: Path | None) -> MigrationResult:
    """The job's report published and its result returned."""
    logger = get_run_logger()
    export = result.export
    result = result.model_copy(update={"step_seconds": timed.seconds})
    progress.complete()
    source = (f"provider `{job.provider}`, VM `{job.vm_identifier}`, "
              + ("disks streamed straight into the converted images" if export.streamed else
                 f"export `{export.method}` into `{result.export.directory}`"
                 f"{' (hard-linked)' if result.export.linked else ''}"))
    publish_report(result, title=f"Migration of `{export.vm.name}`", source=source,
                   handoff=handoff, key=f"report-{progress.slug}")
    logger.info("migration of %s finished: %s", job.vm_identifier,
                result.domain_name or handoff or export.directory)
    return result

