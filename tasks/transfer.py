"""The transfer step: verify what the export wrote and stage its disks for conversion
(hyper2kvm.staging does the work)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from core.models import ExportResult
from hyper2kvm.staging import StagedVM, stage_export
from tasks.progress import JobProgress


@task(name="transfer", persist_result=True)
def transfer_files(export: ExportResult, roots: list[Path]) -> StagedVM:
    """Verify the exported files' structure, sizes and descriptor checksum, and that each
    disk is what it claims and reads nothing outside `roots`; stage the disks."""
    progress = JobProgress.for_current_run(export.vm.name)
    progress.start("transfer", export.total_bytes)
    staged = stage_export(export, roots)
    progress.finish()
    get_run_logger().info(
        "staged %d disk(s): %s", len(staged.disks),
        ", ".join(f"{d.path.name}@{d.offset} ({d.format}, {d.size} bytes, "
                  f"{'checksum from manifest' if d.digest else 'size checked'})"
                  for d in staged.disks),
    )
    return staged
