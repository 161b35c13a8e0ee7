"""AWS export through the provider against the least work that reads the same bytes.

Starts moto's server (tests/moto_extensions.py), makes an instance with one 2 GiB volume
whose first half holds random data and whose second half was never written, then
alternates, --rounds times: the provider's export (transport ebs, method disks:
create_snapshots, list_snapshot_blocks, parallel get_snapshot_block with checksums into
a sparse raw file, SHA-256 of the file) and a bare loop: create_snapshot, then the same
number of threads calling get_snapshot_block over the same blocks with boto3, dropping
the bytes.
Prints the medians, both throughputs (data bytes per second) and their ratio
(target >= 0.8). Then runs one whole migration job (export, transfer, convert to qcow2,
libvirt domain) through hypervisord and prints its time against its export step.
Run: .venv/bin/python bench/aws_export.py [--rounds 3] [--volume-gib 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import AWSProviderConfig, Config  # noqa: E402
from core.models import ExportOptions  # noqa: E402
from providers.aws import AWSProvider  # noqa: E402
from tests.aws_sim import REGION, Moto, start_moto  # noqa: E402
from tests.peers import peers_and_daemon, wait_for_job  # noqa: E402

MIB = 1 << 20


def bare_read(moto: Moto, volume_id: str, threads: int) -> tuple[float, int]:
    """(seconds, bytes) of reading every listed block of a fresh snapshot, `threads` at
    once, with nothing but boto3."""
    ec2, ebs = moto.client("ec2"), moto.client("ebs")
    start = time.perf_counter()  # the snapshot is part of the work, as in the provider's
    snapshot = ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    try:
        blocks, token = [], None
        while True:
            page = ebs.list_snapshot_blocks(SnapshotId=snapshot, MaxResults=10000,
                                            **({"NextToken": token} if token else {}))
            blocks += page["Blocks"]
            token = page.get("NextToken")
            if not token:
                break

        def read(block: dict) -> int:
            answer = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=block["BlockIndex"],
                                            BlockToken=block["BlockToken"])
            return len(answer["BlockData"].read())

        with ThreadPoolExecutor(max_workers=threads) as pool:
            total = sum(pool.map(read, blocks))
        return time.perf_counter() - start, total
    finally:
        ec2.delete_snapshot(SnapshotId=snapshot)


def provider_export(moto: Moto, instance_id: str, dest: Path, settings: Config) -> float:
    config = AWSProviderConfig(region=REGION, access_key_id=moto.access_key,
                               secret_access_key=moto.secret_key,  # type: ignore[arg-type]
                               endpoint_url=moto.url)
    provider = AWSProvider(config, settings=settings)
    start = time.perf_counter()
    provider.export(instance_id, dest, method="disks", options=ExportOptions())
    seconds = time.perf_counter() - start
    shutil.rmtree(dest)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--volume-gib", type=int, default=2)
    parser.add_argument("--no-job", action="store_true", help="skip the whole-job timing")
    args = parser.parse_args()

    moto = start_moto()
    work = Path(tempfile.mkdtemp(prefix="bench-aws-", dir="/var/tmp"))
    try:
        content = work / "content.raw"
        data_bytes = args.volume_gib * 1024 * MIB // 2
        with content.open("wb") as out:
            block = os.urandom(64 * MIB)
            for _ in range(data_bytes // len(block)):
                out.write(block[:-1] + os.urandom(1))  # no two blocks alike
        instance = moto.instance("bench-aws", volumes_gib=[args.volume_gib],
                                 contents=[content])
        instance_id = instance["InstanceId"]
        volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
        settings = Config()
        threads = settings.export.part_concurrency
        print(f"volume {args.volume_gib} GiB, {data_bytes // MIB} MiB of data, "
              f"{threads} parallel block reads")

        bare, ours = [], []
        for round_ in range(args.rounds):
            seconds, total = bare_read(moto, volume_id, threads)
            assert total == data_bytes, (total, data_bytes)
            bare.append(seconds)
            ours.append(provider_export(moto, instance_id, work / f"export-{round_}",
                                        settings))
            print(f"round {round_ + 1}: bare {bare[-1]:.2f} s, provider {ours[-1]:.2f} s")
        bare_s, ours_s = statistics.median(bare), statistics.median(ours)
        print(f"bare get_snapshot_block loop: {bare_s:.2f} s, "
              f"{data_bytes / MIB / bare_s:.0f} MiB/s of data")
        print(f"provider export (ebs):        {ours_s:.2f} s, "
              f"{data_bytes / MIB / ours_s:.0f} MiB/s of data")
        print(f"ratio provider/bare: {bare_s / ours_s:.2f} (target >= 0.8)")

        if args.no_job:
            return
        with peers_and_daemon("bench-aws", api_key="bench",
                              clouds=moto.config_section()) as daemon, \
                daemon.client() as api:
            start = time.perf_counter()
            job = api.post("/jobs/submit", json={
                "vm_identifier": instance_id, "provider": "aws",
                "hyper2kvm_integration": {"replace_existing": True}}).json()["job_id"]
            info = wait_for_job(api, job, timeout=1800)
            whole = time.perf_counter() - start
            assert info["status"] == "completed", info["error"]
            steps = info["result"]["step_seconds"]
            print(f"whole migration job: {whole:.1f} s (export {steps['export']:.1f} s, "
                  f"transfer {steps.get('transfer', 0):.1f} s, convert "
                  f"{steps.get('convert', 0):.1f} s); job/export "
                  f"{whole / steps['export']:.2f}")
            print(f"  steps: {', '.join(f'{k} {v:.1f} s' for k, v in steps.items())}")
    finally:
        moto.process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
