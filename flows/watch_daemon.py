"""`hyper2kvm daemon`: a watch directory whose every job is a `convert-vm` flow run, so it
shows in the Prefect UI (PREFECT_API_URL names the server; without it Prefect runs a
temporary one in process)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from core.config import config_from_env
from core.models import ConversionOptions, ConvertRequest, WatchJob
from hyper2kvm.watch import WatchDaemon

logger = logging.getLogger("hyper2kvm.daemon")


def converter(output_dir: Path, source_roots: list[Path], fmt: str,  # type: ignore[no-untyped-def]
              compress: bool):
    """The conversion a job runs: convert-vm with the daemon's defaults for what the
    manifest leaves open, its sources confined to `source_roots`."""
    from flows.convert_vm import convert_watched

    def convert(job: WatchJob) -> dict[str, Any]:
        options = job.conversion_options
        request = ConvertRequest(
            **job.model_dump(exclude={"job_id", "conversion_options"}),
            conversion_options=ConversionOptions(
                format=options.format or fmt,  # type: ignore[arg-type]
                compression=compress if options.compression is None else options.compression,
                preallocation=options.preallocation, checksum=True))
        result = convert_watched.with_options(flow_run_name=f"convert {job.job_id}")(
            request, source_roots=[str(r) for r in source_roots],
            output_root=str(output_dir))
        return result.model_dump(mode="json")

    return convert


def use_embedded_credential(stored: Path) -> None:
    """Authenticate with hypervisord's embedded Prefect server using the credential it
    keeps (root-only) unless PREFECT_API_AUTH_STRING is given. Before Prefect is imported:
    it reads its settings then."""
    if not os.environ.get("PREFECT_API_AUTH_STRING") and stored.is_file():
        with contextlib.suppress(OSError):
            os.environ["PREFECT_API_AUTH_STRING"] = stored.read_text().strip()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    watch_dir, output_dir = Path(args.watch_dir), Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = config_from_env()
    roots = [Path(r) for r in args.source_root] or settings.source_roots()
    use_embedded_credential(settings.database.path.parent / "prefect" / "auth_string")
    watch_dir.mkdir(parents=True, exist_ok=True)
    if watch_dir.stat().st_mode & 0o022:
        logger.error("%s is writable by other users, who could drop jobs into it; "
                     "chmod go-w it", watch_dir)
        return 2
    daemon = WatchDaemon(watch_dir, converter(output_dir, roots, args.format, args.compress),
                         workers=args.workers, poll=args.poll)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    logger.info("hyper2kvm daemon%s watching %s, converting to %s in %s, sources read "
                "from %s", f" ({args.instance})" if args.instance else "", watch_dir,
                args.format, output_dir, ", ".join(str(r) for r in roots))
    worker = threading.Thread(target=daemon.run, name="watch")
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    logger.info("hyper2kvm daemon stopped")
    return 0
