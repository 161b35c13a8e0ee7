"""The guest step: virt-v2v-in-place on the converted disks, with the job's progress and
logs. While it runs the disks carry their partial names, so that a cancelled, crashed or
failed conversion leaves none of them where a finished one would be.

`auto` (the default) converts where virt-v2v finds an operating system it can convert;
where it finds none (a data-only VM, an appliance, a BSD, a boot sector) the disks stay as
copied and the job goes on with compatible hardware. `true` converts or fails the job."""

from __future__ import annotations

from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from core.config import Hyper2kvmConfig
from core.errors import GuestNotConvertible, InvalidRequest
from core.files import partial_path
from core.models import ConvertedDisk, FileState, GuestMode, GuestOptions, GuestReport, VMInfo
from hyper2kvm import guest
from tasks.progress import JobProgress


def guest_mode(options: GuestOptions, settings: Hyper2kvmConfig) -> GuestMode:
    """The job's choice, else the config's. Asking for it (true) where virt-v2v-in-place
    is missing is an error, not a silent skip; `auto` there converts nothing."""
    wanted = settings.convert_guest if options.convert_guest is None else options.convert_guest
    if wanted is True and not guest.available():
        raise InvalidRequest(f"guest conversion needs {guest.TOOL}, which is not installed "
                             "on this host (Debian: apt install virt-v2v); or set "
                             "hyper2kvm_integration.convert_guest to false or \"auto\"")
    return wanted


def resolved(options: GuestOptions, settings: Hyper2kvmConfig) -> GuestOptions:
    """`options` with the config's defaults filled in: what another process (the watch
    daemon, with its own config) must do for this job."""
    return options.model_copy(update={
        "convert_guest": guest_mode(options, settings),
        "verify_boot": options.verify_boot or settings.verify_boot,
        "boot_timeout": options.boot_timeout or settings.boot_timeout})


def compat_for(options: GuestOptions, guest: GuestReport | None) -> bool | None:
    """SATA + e1000 or virtio: as asked, else virtio only where the converted guest has
    the drivers (None: the domain's own default)."""
    if options.compat_mode is None and guest is not None:
        return not guest.virtio
    return options.compat_mode


class GuestDone(BaseModel):
    """The step's persisted result: the report, and the disks as the step left them (a
    retry reuses the step only while they are still so)."""

    model_config = ConfigDict(extra="forbid")

    report: GuestReport
    disks: list[FileState]

    def changed(self) -> str | None:
        return next((problem for disk in self.disks if (problem := disk.changed())), None)


@task(name="guest", persist_result=True)
def convert_guest_os(vm: VMInfo, disks: list[ConvertedDisk], settings: Hyper2kvmConfig, *,
                     mode: GuestMode = True) -> GuestDone:
    """Make the guest on `disks` boot on KVM; on failure the disks are removed. In `auto`
    mode a guest virt-v2v cannot convert keeps its disks as they were."""
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
    except GuestNotConvertible as exc:
        if mode != "auto":
            for partial in working:
                partial.path.unlink(missing_ok=True)
            raise
        # inspection found nothing to convert and wrote nothing: the disks are as copied
        report = GuestReport(converted=False, warnings=[
            f"no operating system it can convert ({exc}); the disks are as copied and the "
            "domain gets SATA disks and an e1000 NIC, as the source had them"])
    except BaseException:
        for partial in working:
            partial.path.unlink(missing_ok=True)
        raise
    for disk, partial in zip(disks, working, strict=True):
        partial.path.rename(disk.path)
    progress.finish()
    if report.converted:
        logger.info("guest: %s %s (%s, %s), kernels %s; %s; virtio drivers: %s; %.0f s with "
                    "%s", report.distribution or report.os_type or "unknown OS",
                    report.version or "", report.arch or "?", report.firmware or "?",
                    ", ".join(report.kernels) or "-", "; ".join(report.changes) or "no changes",
                    "yes" if report.virtio else "no", report.seconds, report.accelerator)
    for warning in report.warnings:
        logger.warning("guest conversion: %s", warning)
    return GuestDone(report=report, disks=[FileState.of(disk.path) for disk in disks])
