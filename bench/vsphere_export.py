"""vSphere export through the provider against curl, from the same vCenter simulator.

Starts vcsim (tests/vcsim, built when missing), creates a VM with two 1 GiB disks laid
out as ESXi stores them (a monolithicFlat descriptor + its -flat extent, the extents
written straight into the simulator's datastore folder), then alternates, --rounds times:
the provider's export (transport datastore, method vmdk: both disks in parallel, every
file hashed) and two parallel `curl` processes fetching the same two extents, and the
same two curls piped through `sha256sum` (the work the provider does). Prints the
medians, the throughputs and the ratio provider/curl (target >= 0.9). Also times one
listing of 1,000 VMs (a second simulator with 500 VMs per resource pool).
Run: .venv/bin/python bench/vsphere_export.py [--rounds 3] [--disk-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config  # noqa: E402
from core.models import ExportOptions, VMFilter  # noqa: E402
from providers import get_provider  # noqa: E402
from tests.vsphere_sim import PASSWORD, USER, create_vm, start_vcsim  # noqa: E402

MIB = 1 << 20


def write_flat_disk(folder: Path, name: str, size_mib: int) -> None:
    """`name.vmdk` (descriptor) + `name-flat.vmdk` (the bytes), as ESXi writes them."""
    block = os.urandom(64 * MIB)
    with (folder / f"{name}-flat.vmdk").open("wb") as flat:
        for _ in range(size_mib // 64):
            flat.write(block)
    sectors = size_mib * MIB // 512
    (folder / f"{name}.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="vmfs"\n\n# Extent description\n'
        f'RW {sectors} VMFS "{name}-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "14"\n')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=1024)
    args = parser.parse_args()

    server = start_vcsim("nfc")
    work = Path(tempfile.mkdtemp(prefix="bench-vsphere-", dir="/var/tmp"))
    try:
        si = server.connect()
        vm = create_vm(si, "bench-vm", disks_mib=[args.disk_mib, args.disk_mib])
        folder = Path(server.datastores["LocalDS_0"]) / "bench-vm"
        names = ["bench-vm", "bench-vm_1"]
        for name in names:
            write_flat_disk(folder, name, args.disk_mib)
        total = 2 * args.disk_mib * MIB
        settings = Config.model_validate({
            "providers": {"vsphere": {"host": server.host, "username": USER,
                                      "password": PASSWORD, "insecure": True}},
        })
        provider = get_provider("vsphere", settings)
        provider.get_vm(vm._moId)  # log in once, as a daemon's pooled session would be
        urls = [f"https://{server.host}/folder/bench-vm/{n}-flat.vmdk?dcPath=DC0"
                f"&dsName=LocalDS_0" for n in names]

        ours: list[float] = []
        theirs: list[float] = []
        hashed: list[float] = []
        for round_ in range(args.rounds):
            dest = work / "export"
            shutil.rmtree(dest, ignore_errors=True)
            started = time.monotonic()
            result = provider.export(vm._moId, dest, method="vmdk",
                                     options=ExportOptions(transport="datastore"))
            ours.append(time.monotonic() - started)
            assert sum(f.size for f in result.files if f.role == "other") == total
            shutil.rmtree(dest)

            curl_dir = work / "curl"
            shutil.rmtree(curl_dir, ignore_errors=True)
            curl_dir.mkdir()
            started = time.monotonic()
            processes = [subprocess.Popen(["curl", "-sSfk", "-o", str(curl_dir / f"{i}.vmdk"),
                                           url]) for i, url in enumerate(urls)]
            assert all(p.wait() == 0 for p in processes)
            theirs.append(time.monotonic() - started)
            shutil.rmtree(curl_dir)
            curl_dir.mkdir()
            # the same work as ours: every byte also hashed (curl | tee file | sha256sum)
            started = time.monotonic()
            processes = [subprocess.Popen(
                f"curl -sSfk '{url}' | tee {curl_dir / str(i)} | sha256sum >/dev/null",
                shell=True) for i, url in enumerate(urls)]
            assert all(p.wait() == 0 for p in processes)
            hashed.append(time.monotonic() - started)
            shutil.rmtree(curl_dir)
            print(f"round {round_ + 1}: provider {ours[-1]:.2f} s, curl {theirs[-1]:.2f} s, "
                  f"curl+sha256sum {hashed[-1]:.2f} s", flush=True)

        mine, curl = statistics.median(ours), statistics.median(theirs)
        curl_hashed = statistics.median(hashed)
        print(f"export of 2 x {args.disk_mib} MiB (median of {args.rounds}):")
        print(f"  provider (datastore, hashed)  {mine:6.2f} s  {total / MIB / mine:8.0f} MiB/s")
        print(f"  curl x2 in parallel           {curl:6.2f} s  {total / MIB / curl:8.0f} MiB/s")
        print(f"  curl x2 | tee | sha256sum     {curl_hashed:6.2f} s  "
              f"{total / MIB / curl_hashed:8.0f} MiB/s")
        print(f"  throughput ratio provider/curl: {curl / mine:.2f} (target >= 0.9)")
        print(f"  throughput ratio provider/(curl+sha256sum): {curl_hashed / mine:.2f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    big = start_vcsim("upstream", vms=500)
    try:
        provider = get_provider("vsphere", Config.model_validate({
            "providers": {"vsphere": {"host": big.host, "username": USER,
                                      "password": PASSWORD, "insecure": True}}}))
        started = time.monotonic()
        count = len(provider.list_vms(VMFilter()))
        print(f"inventory: listed {count} VMs in {time.monotonic() - started:.2f} s "
              "(login, one PropertyCollector retrieval, folders, tags)")
    finally:
        big.stop()


if __name__ == "__main__":
    main()
