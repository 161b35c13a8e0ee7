"""The convert step: hyper2kvm.convert with the job's progress and logger."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task

from core.models import ConvertedDisk
from hyper2kvm.convert import convert_staged
from hyper2kvm.staging import StagedVM
from tasks.progress import JobProgress


@task(name="convert", persist_result=True)
def convert_disks(
    staged: StagedVM,
    folder: Path,
    output_format: Literal["qcow2", "raw"],
    compress: bool,
    preallocation: str | None = None,
    checksum: bool = False,
) -> list[ConvertedDisk]:
    """Convert every disk into `folder`; on failure nothing is left there."""
    progress = JobProgress.for_current_run(staged.vm.name)
    converted = convert_staged(staged, folder, output_format=output_format,
                               compress=compress, preallocation=preallocation,
                               checksum=checksum,
                               on_start=lambda total: progress.start("convert", total),
                               progress=progress.advance)
    for disk in converted:
        get_run_logger().info("converted %s → %s (%d bytes virtual) in %.1fs%s", disk.source,
                              disk.path.name, disk.virtual_size, disk.seconds,
                              f", {disk.verified} verified" if disk.verified else "")
    progress.finish()
    return converted
