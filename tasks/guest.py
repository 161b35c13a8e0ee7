"""The guest step: virt-v2v-in-place on the converted disks, with the job's progress and
logs. While it runs the disks carry their partial names, so that a cancelled, crashed or
failed conversion leaves none of them where a finished one would be."""

from __future__ import annotations

from prefect import get_run_logger, task

from core.config import Hyper2kvmConfig
from core.errors import InvalidRequest
from core.files import partial_path
from core.models import ConvertedDisk, GuestOptions, GuestReport, VMInfo
from hyper2kvm import guest
from tasks.progress import JobProgress


def converts_guest(options: GuestOptions, settings: Hyper2kvmConfig) -> bool:
    """The job's choice, else the config's, else: wherever virt-v2v-in-place is installed.
    Asking for it where it is missing is an error, not a silent skip."""
    wanted = options.convert_guest
    if wanted is None:
        wanted = settings.convert_guest
    if wanted is None:
        return guest.available()
    if wanted and not guest.available():
        raise InvalidRequest(f"guest conversion needs {guest.TOOL}, which is not installed "
                             "on this host (Debian: apt install virt-v2v); or set "
                             "hyper2kvm_integration.convert_guest to false")
    return wanted


def resolved(options: GuestOptions, settings: Hyper2kvmConfig) -> GuestOptions:
    """`options` with the config's defaults filled in: what another process (the watch
    daemon, with its own config) must do for this job."""
    return options.model_copy(update={
        "convert_guest": converts_guest(options, settings),
        "verify_boot": options.verify_boot or settings.verify_boot,
        "boot_timeout": options.boot_timeout or settings.boot_timeout})


@task(name="guest", persist_result=True)
def convert_guest_os(vm: VMInfo, disks: list[ConvertedDisk],
                     settings: Hyper2kvmConfig) -> GuestReport:
    """Make the guest on `disks` boot on KVM; on failure the disks are removed."""
    progress = JobProgress.for_current_run(vm.name)
    progress.start("guest", 0)
    logger = get_run_logger()
    working = [disk.model_copy(update={"path": partial_path(disk.path)}) for disk in disks]
    for disk, partial in zip(disks, working, strict=True):
        disk.path.rename(partial.path)
    try:
        report = guest.convert_guest(
            vm, working, uri=settings.libvirt_uri,
            log_file=disks[0].path.parent / "guest-conversion.log",
            timeout=settings.guest_timeout, virtio_win=settings.virtio_win,
            on_line=lambda line: logger.info("virt-v2v: %s", line),
            on_stage=progress.step)
    except BaseException:
        for partial in working:
            partial.path.unlink(missing_ok=True)
        raise
    for disk, partial in zip(disks, working, strict=True):
        partial.path.rename(disk.path)
    progress.finish()
    logger.info("guest: %s %s (%s, %s), kernels %s; %s; virtio drivers: %s; %.0f s with %s",
                report.distribution or report.os_type or "unknown OS", report.version or "",
                report.arch or "?", report.firmware or "?", ", ".join(report.kernels) or "-",
                "; ".join(report.changes) or "no changes", "yes" if report.virtio else "no",
                report.seconds, report.accelerator)
    for warning in report.warnings:
        logger.warning("virt-v2v warning: %s", warning)
    return report



