"""convert-vm: an OVA, OVF or disk image already on disk → qcow2/raw (→ libvirt domain)."""

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun, State

from core.config import config_from_env
from core.errors import InvalidRequest
from core.files import remove_partials
from core.models import ConvertRequest, MigrationResult
from core.paths import confine, confine_any, safe_name
from core.process import exit_with_daemon
from flows.bootable import make_bootable
from flows.report import StepTimer, publish_report
from hyper2kvm.convert import changed_outputs
from hyper2kvm.staging import StagedVM, describe_source
from tasks.convert import convert_disks
from tasks.progress import JobProgress
from tasks.reuse import proven
from tasks.transfer import transfer_files
from tasks.validate import check_this_host


def source_file(request: ConvertRequest, roots: list[Path]) -> Path:
    """The file to convert: an existing file inside one of `roots`."""
    source = confine_any(request.source_path, roots, what="source_path")
    if not source.is_file():
        raise InvalidRequest(f"source_path {request.source_path} is not a file")
    return source


def output_folder(request: ConvertRequest, vm_name: str, root: Path) -> Path:
    """The output folder, confined to `root`."""
    return confine(request.output_path or safe_name(vm_name), root, what="output_path")


def clean_up_after(flow: Any, flow_run: FlowRun, state: State) -> None:
    """On cancel or crash: no half-written file stays where a finished one would be."""
    try:
        request = ConvertRequest.model_validate(flow_run.parameters["request"])
        root = (Path(flow_run.parameters["output_root"]) if "output_root" in
                flow_run.parameters else config_from_env().hyper2kvm.output_dir)
        folder = output_folder(request, Path(request.source_path).stem, root)
    except Exception:  # noqa: BLE001 - a hook must never fail the state change
        return
    remove_partials(folder)


def convert_confined(request: ConvertRequest, *, roots: list[Path],
                     output_root: Path) -> MigrationResult:
    """The conversion both flows run: every path checked before a file is touched, the
    source (with its whole chain) inside `roots`, the output inside `output_root`."""
    settings = config_from_env()
    h2k = settings.hyper2kvm
    source = source_file(request, roots)
    progress = JobProgress.for_current_run(source.stem)
    timed = StepTimer()
    export = describe_source(source)
    folder = output_folder(request, export.vm.name, output_root)
    staged = timed("transfer", lambda: proven(StagedVM.missing, transfer_files, export, roots))
    disks = timed("convert", lambda: proven(
        changed_outputs, convert_disks, staged, folder,
        request.conversion_options.format or h2k.default_format,
        h2k.compression if request.conversion_options.compression is None
        else request.conversion_options.compression,
        request.conversion_options.preallocation, request.conversion_options.checksum))
    result = MigrationResult(vm=export.vm.name, export=export, disks=disks, **make_bootable(
        staged.vm, disks, h2k, request, register=request.import_to_kvm,
        autostart=request.autostart, replace=request.replace, timed=timed))
    result = result.model_copy(update={"step_seconds": timed.seconds})
    progress.complete()
    publish_report(result, title=f"Conversion of `{export.vm.name}`",
                   source=f"`{source}`", key=f"report-{progress.slug}")
    get_run_logger().info("converted %s into %s", source, folder)
    return result


FLOW_OPTIONS: dict[str, Any] = {
    "name": "convert-vm", "flow_run_name": "convert {request.source_path}",
    "persist_result": True, "on_cancellation": [clean_up_after],
    "on_crashed": [clean_up_after]}


@flow(**FLOW_OPTIONS)
def convert_vm(request: ConvertRequest) -> MigrationResult:
    """Convert the VM at `request.source_path` (and register it when asked). This is the
    served deployment: whoever created the run (the REST API, Prefect's API or UI, a
    schedule), the source must be inside the configured roots and the output inside
    hyper2kvm.output_dir, checked here as the REST API checks them."""
    exit_with_daemon()  # a SIGKILLed hypervisord leaves no run behind
    settings = config_from_env()
    check_this_host(settings, provider="", converts=True)
    return convert_confined(request, roots=settings.source_roots(),
                            output_root=settings.hyper2kvm.output_dir)


@flow(**FLOW_OPTIONS)
def convert_watched(request: ConvertRequest, source_roots: list[str],
                    output_root: str) -> MigrationResult:
    """The watch-directory daemon's conversion, run in that daemon's own process with its
    --source-root and --output-dir. Never deployed, so no API client can start it."""
    return convert_confined(request, roots=[Path(r) for r in source_roots],
                            output_root=Path(output_root))
