"""What a transient failure costs the export task's retry, with and without resuming.

Starts moto's server (tests/moto_extensions.py), makes an instance with one volume of
--mib MiB of random data whose middle block fails twice (`moto-test:fail-blocks`), and
exports it through the AWS provider (transport ebs) three ways:
* cold: a new job (its own snapshot, whose middle block's two failures are retried in
  place, as the default retries allow);
* attempt 1 of a job with one retry per block and a budget of 0 s: it fails transiently at
  the middle block, keeping its snapshot and what it read;
* attempt 2 of the same job (what Prefect's task retry runs): the same snapshot, the blocks
  before the failure read from the disk, the rest from EBS.
Prints each time, the bytes attempt 2 fetched from EBS and took from the disk, and the ratio
of attempt 2 to the cold export (a restart would cost about 1.0).
Run: .venv/bin/python bench/resume.py [--mib 512]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import AWSProviderConfig, Config  # noqa: E402
from core.errors import Transient  # noqa: E402
from core.models import ExportOptions  # noqa: E402
from providers.aws import AWSProvider  # noqa: E402
from tests.aws_sim import REGION, Moto, start_moto  # noqa: E402

MIB = 1 << 20
BLOCK = 512 << 10


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def provider(moto: Moto, settings: Config) -> AWSProvider:
    config = AWSProviderConfig.model_validate({
        "region": REGION, "access_key_id": moto.access_key,
        "secret_access_key": moto.secret_key, "endpoint_url": moto.url})
    return AWSProvider(config, settings=settings)


def timed_export(aws: AWSProvider, instance: str, out: Path, job: str) -> float:
    start = time.perf_counter()
    aws.export(instance, out, method="disks", options=ExportOptions(), job=job)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    lines = Lines()
    logging.getLogger("providers").addHandler(lines)
    logging.getLogger("providers").setLevel(logging.INFO)
    moto = start_moto()
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
            image = Path(work) / "volume.raw"
            image.write_bytes(os.urandom(args.mib * MIB))
            middle = args.mib * MIB // BLOCK // 2
            instance = moto.instance("bench-resume", volumes_gib=[1], contents=[image],
                                     volume_tags=[{"moto-test:fail-blocks": f"{middle}:2"}])
            instance_id = instance["InstanceId"]
            impatient = Config.model_validate({"export": {"throttle_budget": 0,
                                                          "part_retries": 1}})
            patient = Config()
            first = time.perf_counter()
            try:
                provider(moto, impatient).export(instance_id, Path(work) / "job",
                                                 method="disks", options=ExportOptions(),
                                                 job="bench-resume-job")
                raise SystemExit("attempt 1 did not fail: the fault did not take")
            except Transient:
                attempt1 = time.perf_counter() - first
            lines.lines.clear()
            attempt2 = timed_export(provider(moto, patient), instance_id, Path(work) / "job",
                                    "bench-resume-job")
            summary = next(line for line in lines.lines if "bytes of data read" in line)
            fetched, resumed = (int(n) for n in re.findall(
                r"(\d+) bytes (?:of data read|from an earlier)", summary))
            for path in (Path(work) / "job").iterdir():
                path.unlink()
            cold = timed_export(provider(moto, patient), instance_id, Path(work) / "cold",
                                "bench-resume-cold")
    finally:
        moto.process.kill()
    print(f"volume: {args.mib} MiB of random data, the block at {middle * BLOCK // MIB} MiB "
          "failing twice")
    print(f"cold export:            {cold:7.2f} s")
    print(f"attempt 1 (fails):      {attempt1:7.2f} s")
    print(f"attempt 2 (resumed):    {attempt2:7.2f} s  fetched {fetched / MIB:.0f} MiB from "
          f"EBS, {resumed / MIB:.0f} MiB from the disk")
    print(f"attempt 2 / cold:       {attempt2 / cold:7.2f}  (a restart: ~1.0)")


if __name__ == "__main__":
    main()
