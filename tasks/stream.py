"""The one-pass step: the provider streams every disk straight into its converted image
(export and conversion at once; nothing written to the export folder)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from core.config import config_from_env
from core.errors import ProviderError
from core.models import ConvertedDisk, JobDefinition, VMInfo
from hyper2kvm.convert import changed_outputs, output_paths
from hyper2kvm.output import OutputImage
from providers import get_provider
from tasks.export import export_slot, only_transient
from tasks.progress import JobProgress, current_flow_run_id


class StreamedVM(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: VMInfo
    disks: list[ConvertedDisk]


def streamed_disks_changed(streamed: StreamedVM | None) -> str | None:
    """What no longer holds of the streamed disks (None: nothing was streamed)."""
    return None if streamed is None else changed_outputs(streamed.disks)


@task(name="stream", persist_result=True, retry_condition_fn=only_transient,
      retry_delay_seconds=[2, 10, 30])
def stream_vm(job: JobDefinition, vm: VMInfo, folder: Path,
              output_format: Literal["qcow2", "raw"]) -> StreamedVM | None:
    """Stream the VM's disks into `folder` as `output_format` images; None when its
    provider (or this VM's disk layout) does not stream, with nothing written. On failure
    nothing is left in `folder`; outputs get their final names only once all are done."""
    settings = config_from_env()
    logger = get_run_logger()
    progress = JobProgress.for_current_run(job.vm_identifier)
    targets = output_paths(vm.name, len(vm.disks), folder, output_format)
    outputs: dict[int, OutputImage] = {}
    created_folder = not folder.exists()

    def open_output(index: int, size: int) -> OutputImage:
        output = OutputImage(targets[index], output_format=output_format, size=size)
        outputs[index] = output
        return output.open()

    started = time.monotonic()
    try:
        with (
            export_slot(progress),
            get_provider(job.provider, settings) as provider,
        ):
            progress.start("stream", sum(d.capacity_bytes for d in vm.disks))
            exported = provider.stream(job.vm_identifier, open_output, options=job.options,
                                       progress=progress.advance,
                                       job=str(current_flow_run_id()))
        if exported is None:
            logger.info("%s: its disks' layout does not stream; two passes instead",
                        vm.name)
            return None
        if sorted(outputs) != list(range(len(vm.disks))):
            raise ProviderError(f"{job.provider} streamed {len(outputs)} of {len(vm.disks)} disks")
        seconds = round(time.monotonic() - started, 3)
        disks = []
        for index in sorted(outputs):
            output = outputs[index]
            facts = output.finish()
            disks.append(ConvertedDisk(
                source=vm.disks[index].file or vm.disks[index].name, path=output.target,
                format=output_format, virtual_size=facts["virtual_size"],
                actual_size=facts["actual_size"], seconds=seconds))
        for output in outputs.values():
            output.commit()
    except BaseException:
        for output in outputs.values():
            output.discard()
        if created_folder and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    progress.finish()
    for disk in disks:
        logger.info("streamed %s → %s (%d bytes virtual, %d written)", disk.source,
                    disk.path.name, disk.virtual_size, disk.actual_size)
    return StreamedVM(vm=exported, disks=disks)
