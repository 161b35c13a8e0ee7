"""`hyper2kvm daemon`: a watch directory whose every job is a `convert-vm` flow run, so it
shows in the Prefect UI (PREFECT_API_URL names the server; without it Prefect runs a
temporary one in process)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from core.models import ConversionOptions, ConvertRequest, WatchJob
from hyper2kvm.watch import WatchDaemon

logger = logging.getLogger("hyper2kvm.daemon")


def converter(output_dir: Path, fmt: str, compress: bool):  # type: ignore[no-untyped-def]
    """The conversion a job runs: convert-vm with the daemon's defaults for what the
    manifest leaves open."""
    from flows.convert_vm import convert_vm

    def convert(job: WatchJob) -> dict[str, Any]:
        options = job.conversion_options
        request = ConvertRequest(
            **job.model_dump(exclude={"job_id", "conversion_options"}),
            conversion_options=ConversionOptions(
                format=options.format or fmt,  # type: ignore[arg-type]
                compression=compress if options.compression is None else options.compression,
                preallocation=options.preallocation, checksum=True))
        result = convert_vm.with_options(flow_run_name=f"convert {job.job_id}")(
            request, output_root=str(output_dir))
        return result.model_dump(mode="json")

    return convert


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    watch_dir, output_dir = Path(args.watch_dir), Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    daemon = WatchDaemon(watch_dir, converter(output_dir, args.format, args.compress),
                         workers=args.workers, poll=args.poll)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    logger.info("hyper2kvm daemon%s watching %s, converting to %s in %s",
                f" ({args.instance})" if args.instance else "", watch_dir, args.format,
                output_dir)
    worker = threading.Thread(target=daemon.run, name="watch")
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    logger.info("hyper2kvm daemon stopped")
    return 0
