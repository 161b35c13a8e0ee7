"""Azure export through the provider against a bare parallel ranged download.

Starts Azurite and the ARM stand-in (tests/azure_sim.py; SAS URLs straight to Azurite),
makes a VM with one 2 GiB managed disk whose first half holds random data and whose
second half was never written, then alternates, --rounds times: the provider's export
(snapshot, grant access, page ranges read in parallel with azure-storage-blob into a
sparse raw file, VHD footer checked, SHA-256 of the file, access revoked, snapshot
deleted) and a bare loop over the same snapshot: list_page_ranges, then the same ranges
in parts of the same size, the same number of threads, each written at its offset into
a sparse file (what a download ends with; no checksum, no fsync). Prints the medians,
both throughputs (data bytes per second) and their ratio (target >= 0.8).
Run: .venv/bin/python bench/azure_export.py [--rounds 3] [--disk-gib 2]
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

from azure.storage.blob import BlobClient  # noqa: E402

from core.config import AzureProviderConfig, Config  # noqa: E402
from core.models import ExportOptions  # noqa: E402
from providers.azure import AzureProvider, export  # noqa: E402
from tests.azure_arm_standin import CLIENT_ID, TENANT  # noqa: E402
from tests.azure_sim import start_azure  # noqa: E402

MIB = 1 << 20


def bare_read(provider: AzureProvider, disk_id: str, part_size: int, threads: int,
              target: Path) -> tuple[float, int]:
    """(seconds, bytes): snapshot + access (as the provider needs them too), then every
    page range read in parallel with azure-storage-blob alone into `target`."""
    clients = provider.clients
    start = time.perf_counter()
    snapshot = export.create_snapshot(clients, disk_id, "westeurope", "bare")
    try:
        blob = BlobClient.from_blob_url(export.grant_read(clients, snapshot))
        size = blob.get_blob_properties().size - export.FOOTER
        ranges = [(offset, min(part_size, min(r.end + 1, size) - offset))
                  for r in blob.list_page_ranges() if not r.cleared
                  for offset in range(r.start, min(r.end + 1, size), part_size)]

        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        def read(piece: tuple[int, int]) -> int:
            data = blob.download_blob(offset=piece[0], length=piece[1]).readall()
            return os.pwrite(fd, data, piece[0])

        try:
            os.ftruncate(fd, size)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                total = sum(pool.map(read, ranges))
        finally:
            os.close(fd)
        return time.perf_counter() - start, total
    finally:
        export.remove_snapshot(clients, snapshot)
        target.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-gib", type=int, default=2)
    args = parser.parse_args()

    azure = start_azure(proxy=False)
    work = Path(tempfile.mkdtemp(prefix="bench-azure-", dir="/var/tmp"))
    try:
        content = work / "content.raw"
        data_bytes = args.disk_gib * 1024 * MIB // 2
        with content.open("wb") as out:
            block = os.urandom(64 * MIB)
            for _ in range(data_bytes // len(block)):
                out.write(block[:-1] + os.urandom(1))
        start = time.perf_counter()
        azure.standin.add_vm("bench", "vm", disks=[(args.disk_gib << 30, content)])
        print(f"disk {args.disk_gib} GiB ({data_bytes // MIB} MiB of data) uploaded to "
              f"Azurite in {time.perf_counter() - start:.1f} s")
        config = AzureProviderConfig(subscription_id=azure.subscription, tenant_id=TENANT,
                                     client_id=CLIENT_ID,
                                     client_secret=azure.secret,  # type: ignore[arg-type]
                                     arm_endpoint=azure.standin.url,
                                     authority=azure.standin.url, ca_file=azure.standin.ca)
        settings = Config()
        provider = AzureProvider(config, settings=settings)
        disk_id = provider.get_vm("bench/vm").disks[0].datastore
        assert disk_id
        part, threads = settings.export.chunk_size, settings.export.part_concurrency
        print(f"parts of {part // MIB} MiB, {threads} parallel reads")
        bare, ours = [], []
        for round_ in range(args.rounds):
            seconds, total = bare_read(provider, disk_id, part, threads, work / "bare.raw")
            assert total == data_bytes, (total, data_bytes)
            bare.append(seconds)
            dest = work / f"export-{round_}"
            start = time.perf_counter()
            provider.export("bench/vm", dest, method="disks", options=ExportOptions())
            ours.append(time.perf_counter() - start)
            shutil.rmtree(dest)
            print(f"round {round_ + 1}: bare {bare[-1]:.2f} s, provider {ours[-1]:.2f} s")
        bare_s, ours_s = statistics.median(bare), statistics.median(ours)
        print(f"bare ranged download:   {bare_s:.2f} s, {data_bytes / MIB / bare_s:.0f} MiB/s")
        print(f"provider export:        {ours_s:.2f} s, {data_bytes / MIB / ours_s:.0f} MiB/s")
        print(f"ratio provider/bare: {bare_s / ours_s:.2f} (target >= 0.8)")
    finally:
        azure.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
