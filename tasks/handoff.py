"""Hand-off to a hyper2kvm daemon: a job manifest dropped into its watch directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import get_run_logger, task

from core.config import Hyper2kvmConfig
from core.models import ExportResult, JobDefinition


@task(name="handoff", persist_result=True)
def write_watch_manifest(
    job: JobDefinition, export: ExportResult, settings: Hyper2kvmConfig, job_id: str
) -> Path:
    """Write `<watch_dir>/<instance>/<job_id>.json` atomically: the daemon only ever takes
    `*.json`, so it never sees a half-written manifest."""
    folder = settings.watch_dir / job.hyper2kvm_integration.instance
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "job_id": job_id,
        "vm": export.vm.model_dump(mode="json"),
        "files": [f.model_dump(mode="json") for f in export.files],
        "format": settings.default_format,
        "compress": settings.compression,
        "output_dir": str(settings.output_dir),
        "register": True,
        "autostart": job.hyper2kvm_integration.autostart,
        "replace": job.hyper2kvm_integration.replace_existing,
    }
    target = folder / f"{job_id}.json"
    temporary = folder / f".{job_id}.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, target)
    get_run_logger().info("handed %s to the hyper2kvm daemon: %s", export.vm.name, target)
    return target
