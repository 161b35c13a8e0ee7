"""A warm migration's test boot: guest conversion and the boot check run on overlays of the
copy as it is now, while the source keeps running (and the rounds go on after it); the
copy itself is only read."""

from __future__ import annotations

import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import config_from_env
from core.files import partial_path
from core.models import ConvertedDisk, JobDefinition, TestBoot, VMInfo
from core.paths import safe_name
from hyper2kvm import guest as guest_tool
from hyper2kvm import qemu_img
from hyper2kvm.boot import BootOutcome, boot_definition
from hyper2kvm.convert import output_paths
from tasks.guest import compat_for, convert_guest_os, resolved
from tasks.progress import JobProgress
from tasks.register import domain_definition

CONSOLE_LINES = 10


@task(name="test-boot", cache_policy=NO_CACHE)
def trial_boot(job: JobDefinition, vm: VMInfo, folder: Path,
               output_format: Literal["qcow2", "raw"]) -> TestBoot:
    h2k = config_from_env().hyper2kvm
    options = resolved(job.hyper2kvm_integration, h2k)
    assert options.boot_timeout is not None
    progress = JobProgress.for_current_run(job.vm_identifier)
    progress.step("test boot: guest conversion on overlays of the copy", 0.0)
    started, at = time.monotonic(), datetime.now(UTC)
    work = folder / f".test-boot-{uuid.uuid4().hex[:8]}.partial"
    work.mkdir(mode=0o711)  # the qemu user opens the overlays inside
    try:
        disks = []
        for disk, target in zip(vm.disks, output_paths(vm.name, len(vm.disks), folder,
                                                        output_format), strict=True):
            overlay = work / f"{target.stem}.qcow2"
            qemu_img.create_overlay(overlay, partial_path(target), output_format)
            disks.append(ConvertedDisk(source=disk.file or disk.name, path=overlay,
                                       format="qcow2", virtual_size=disk.capacity_bytes,
                                       actual_size=0, seconds=0.0))
        mode = options.convert_guest
        if mode == "auto" and not guest_tool.available():
            mode = False
        guest = convert_guest_os.fn(vm, disks, h2k, mode=mode).report if mode else None
        if guest is not None and not guest.converted and options.boot_pattern is None:
            outcome = BootOutcome(False, "not booted: guest conversion found no operating "
                                  "system, so no login prompt can come", 0.0)
        else:
            progress.step("test boot: booting the converted overlays", 0.5)
            name = f"{safe_name(vm.name)}-test"
            xml = domain_definition(vm, disks, h2k, name=name,
                                    compat=compat_for(options, guest))
            outcome = boot_definition(h2k.libvirt_uri, ET.fromstring(xml), name=name,
                                      timeout=options.boot_timeout,
                                      pattern=options.boot_pattern)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = TestBoot(at=at, booted=outcome.booted, reason=outcome.reason,
                      seconds=round(time.monotonic() - started, 3),
                      guest_converted=guest.converted if guest is not None else None,
                      console=outcome.console[-CONSOLE_LINES:])
    get_run_logger().info("test boot of %s: %s (%s)", vm.name,
                          "booted" if result.booted else "did not boot", result.reason)
    return result
