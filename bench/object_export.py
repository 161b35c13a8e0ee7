"""An exported object downloaded through the GCP provider's reader against a bare parallel
ranged download with google-cloud-storage.

Starts gcp-storage-emulator and the stand-in (tests/gcp_sim.py), uploads one object of
--gib GiB of random data, then alternates, --rounds times: the provider's reader
(providers.gcp.export.read_exported: object described, parallel ranged reads through the
shared ranged reader into a sparse file, SHA-256 and CRC32C of what arrived, writeback
started per part, fsync) and a bare loop: the same ranges, the same part size and number
of threads, each `download_as_bytes` written at its offset into a file. Prints the
medians, both throughputs and their ratio (target >= 0.8).
Run: .venv/bin/python bench/object_export.py [--rounds 3] [--gib 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config, GCPProviderConfig  # noqa: E402
from providers.gcp import export  # noqa: E402
from providers.gcp.session import make_clients  # noqa: E402
from providers.ranged import Reading  # noqa: E402
from tests.gcp_sim import BUCKET, start_gcp  # noqa: E402

MIB = 1 << 20
NAME = "bench/object.qcow2"


def bare_read(clients: object, size: int, part: int, threads: int, target: Path) -> float:
    bucket = clients.storage.bucket(BUCKET)  # type: ignore[attr-defined]
    start = time.perf_counter()
    blob = bucket.blob(NAME)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def read(offset: int) -> int:
        data = blob.download_as_bytes(start=offset, end=min(offset + part, size) - 1,
                                      checksum=None, raw_download=True)
        return os.pwrite(fd, data, offset)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            assert sum(pool.map(read, range(0, size, part))) == size
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gib", type=int, default=2)
    args = parser.parse_args()
    gcp = start_gcp()
    work = Path(tempfile.mkdtemp(prefix="bench-object-", dir="/var/tmp"))
    try:
        settings = Config()
        config = GCPProviderConfig.model_validate(gcp.section(
            storage_endpoint=gcp.storage_endpoint))
        clients = make_clients(config)
        size = args.gib << 30
        source = work / "object"
        with source.open("wb") as out:
            block = os.urandom(64 * MIB)
            for _ in range(size // len(block)):
                out.write(block[:-1] + os.urandom(1))
        start = time.perf_counter()
        clients.storage.bucket(BUCKET).blob(NAME).upload_from_filename(str(source))
        source.unlink()
        print(f"object of {args.gib} GiB uploaded to gcp-storage-emulator in "
              f"{time.perf_counter() - start:.1f} s")
        part, threads = settings.export.chunk_size, settings.export.part_concurrency
        print(f"parts of {part // MIB} MiB, {threads} parallel reads")
        bare, ours = [], []
        for round_ in range(args.rounds):
            bare.append(bare_read(clients, size, part, threads, work / "bare"))
            target = work / "ours.qcow2"
            reading = Reading.from_settings(work, settings.export, None)
            start = time.perf_counter()
            export.read_exported(clients, BUCKET, NAME, target, reading)
            ours.append(time.perf_counter() - start)
            target.unlink()
            print(f"round {round_ + 1}: bare {bare[-1]:.2f} s, provider {ours[-1]:.2f} s")
        bare_s, ours_s = statistics.median(bare), statistics.median(ours)
        print(f"bare ranged download: {bare_s:.2f} s, {size / MIB / bare_s:.0f} MiB/s")
        print(f"provider reader:      {ours_s:.2f} s, {size / MIB / ours_s:.0f} MiB/s")
        print(f"ratio provider/bare: {bare_s / ours_s:.2f} (target >= 0.8)")
    finally:
        gcp.stop()
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
