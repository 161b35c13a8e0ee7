"""The convert step: qemu-img into the output directory, each disk's checksum verified
while qemu-img reads it; outputs appear under their final names only when all are done."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task

from core.errors import VerificationError
from core.files import partial_path
from core.models import ConvertedDisk
from core.paths import safe_name
from hyper2kvm import qemu_img
from hyper2kvm.manifest import digest_file
from tasks.progress import JobProgress
from tasks.transfer import StagedDisk, StagedVM


class _Digest(threading.Thread):
    """Hashes a staged disk alongside the conversion."""

    def __init__(self, disk: StagedDisk) -> None:
        super().__init__(name=f"digest-{disk.path.name}", daemon=True)
        self.disk = disk
        self.actual: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            assert self.disk.algorithm
            self.actual = digest_file(self.disk.path, algorithm=self.disk.algorithm,
                                      offset=self.disk.offset, length=self.disk.size)
        except BaseException as exc:  # noqa: BLE001 - handed to the converting thread
            self.error = exc

    def check(self) -> None:
        self.join()
        if self.error:
            raise self.error
        if self.actual != self.disk.digest:
            raise VerificationError(
                f"{self.disk.disk.file or self.disk.path.name}: {self.disk.algorithm} "
                f"{self.actual} does not match the manifest's {self.disk.digest}")


def output_paths(staged: StagedVM, output_dir: Path, fmt: str) -> list[Path]:
    """Where each disk of the VM lands: <output_dir>/<vm>/<vm>-disk<N>.<fmt>."""
    name = safe_name(staged.vm.name)
    return [output_dir / name / f"{name}-disk{i}.{fmt}" for i in range(1, len(staged.disks) + 1)]


@task(name="convert", persist_result=True)
def convert_disks(
    staged: StagedVM,
    output_dir: Path,
    output_format: Literal["qcow2", "raw"],
    compress: bool,
) -> list[ConvertedDisk]:
    """Convert every disk; on failure nothing is left in the output directory."""
    logger = get_run_logger()
    progress = JobProgress.for_current_run(staged.vm.name)
    targets = output_paths(staged, output_dir, output_format)
    sizes = [qemu_img.info(d.source())["virtual-size"] for d in staged.disks]
    progress.start("convert", sum(sizes))
    folder = targets[0].parent
    created_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    partials = [partial_path(t) for t in targets]
    converted: list[ConvertedDisk] = []
    try:
        for disk, size, target, partial in zip(staged.disks, sizes, targets, partials,
                                               strict=True):
            started = time.monotonic()
            digest = _Digest(disk) if disk.digest else None
            if digest:
                digest.start()
            qemu_img.convert(disk.source(), partial, output_format=output_format,
                             compress=compress,
                             progress=qemu_img.bytes_progress(size, progress.advance))
            if digest:
                digest.check()
            facts = qemu_img.info(qemu_img.DiskSource(partial, output_format))
            converted.append(ConvertedDisk(
                source=disk.disk.file or disk.path.name, path=target, format=output_format,
                virtual_size=facts["virtual-size"], actual_size=facts.get("actual-size", 0),
                seconds=round(time.monotonic() - started, 3)))
            logger.info("converted %s → %s (%d bytes virtual) in %.1fs%s",
                        converted[-1].source, target.name, size, converted[-1].seconds,
                        f", {disk.algorithm} verified" if digest else "")
        for partial, target in zip(partials, targets, strict=True):
            os.replace(partial, target)
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        if created_folder and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    progress.finish()
    return converted
