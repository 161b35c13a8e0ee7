"""convert-vm: an OVA, OVF or disk image already on disk → qcow2/raw (→ libvirt domain)."""

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun, State

from core.config import Config, config_from_env
from core.errors import InvalidRequest
from core.files import remove_partials
from core.models import ConvertRequest, MigrationResult
from core.paths import confine, confine_any, safe_name
from flows.report import StepTimer, publish_report
from hyper2kvm.staging import describe_source
from tasks.convert import convert_disks
from tasks.progress import JobProgress
from tasks.register import register_domain
from tasks.transfer import transfer_files


def source_roots(settings: Config) -> list[Path]:
    """Where conversions may read from: exports, converted images, the local inbox."""
    roots = [settings.export.base_path, settings.hyper2kvm.output_dir]
    if settings.providers.local:
        roots.append(settings.providers.local.path)
    return roots


def source_file(request: ConvertRequest, settings: Config, *, confined: bool = True) -> Path:
    """The file to convert: an existing file, inside the configured roots when `confined`."""
    source = (confine_any(request.source_path, source_roots(settings), what="source_path")
              if confined else Path(request.source_path))
    if not source.is_file():
        raise InvalidRequest(f"source_path {request.source_path} is not a file")
    return source


def output_folder(request: ConvertRequest, settings: Config, vm_name: str,
                  output_root: str | None = None) -> Path:
    """The output folder, confined to `output_root` (default hyper2kvm.output_dir)."""
    root = Path(output_root) if output_root else settings.hyper2kvm.output_dir
    return confine(request.output_path or safe_name(vm_name), root, what="output_path")


def clean_up_after(flow: Any, flow_run: FlowRun, state: State) -> None:
    """On cancel or crash: no half-written file stays where a finished one would be."""
    try:
        request = ConvertRequest.model_validate(flow_run.parameters["request"])
        settings = config_from_env()
        folder = output_folder(request, settings, Path(request.source_path).stem,
                               flow_run.parameters.get("output_root"))
    except Exception:  # noqa: BLE001 - a hook must never fail the state change
        return
    remove_partials(folder)


@flow(
    name="convert-vm",
    flow_run_name="convert {request.source_path}",
    persist_result=True,
    on_cancellation=[clean_up_after],
    on_crashed=[clean_up_after],
)
def convert_vm(request: ConvertRequest, output_root: str | None = None) -> MigrationResult:
    """Convert the VM at `request.source_path` (and register it when asked).

    A watch-directory daemon passes its own `output_root`; its manifests come from a
    directory only root can write, so their sources are not confined to this host's
    configured roots as API requests are."""
    settings = config_from_env()
    h2k = settings.hyper2kvm
    source = source_file(request, settings, confined=output_root is None)
    progress = JobProgress.for_current_run(source.stem)
    timed = StepTimer()
    export = describe_source(source)
    folder = output_folder(request, settings, export.vm.name, output_root)
    staged = timed("transfer", lambda: transfer_files(export))
    disks = timed("convert", lambda: convert_disks(
        staged, folder, request.conversion_options.format or h2k.default_format,
        h2k.compression if request.conversion_options.compression is None
        else request.conversion_options.compression,
        request.conversion_options.preallocation, request.conversion_options.checksum))
    result = MigrationResult(vm=export.vm.name, export=export, disks=disks)
    if request.import_to_kvm:
        registered = timed("register", lambda: register_domain(
            staged.vm, disks, h2k, autostart=request.autostart, replace=request.replace))
        result = result.model_copy(update={
            "domain_name": registered.name, "domain_uuid": registered.uuid,
            "storage_pool": registered.pool,
            "libvirt_uri": registered.uri})
    result = result.model_copy(update={"step_seconds": timed.seconds})
    progress.complete()
    publish_report(result, title=f"Conversion of `{export.vm.name}`",
                   source=f"`{source}`", key=f"report-{progress.slug}")
    get_run_logger().info("converted %s into %s", source, folder)
    return result
