"""vSphere export and migration against curl, from the same vCenter simulator.

Starts vcsim (tests/vcsim, built when missing) and creates two VMs with two 1 GiB disks
each, half random data and half zeros: one laid out as ESXi stores disks (a vmfs
descriptor + its -flat extent), one as stream-optimized VMDKs (what an NFC lease
serves). Then, --rounds times, in one run:

* migration: a migrate-vm job through hypervisord (REST submit → completed: one pass,
  disks streamed into qcow2, domain defined) over the datastore transport, and over NFC;
  against two parallel `curl`s downloading the two flat extents to files. The export
  folder's size is sampled while the jobs run. Target: datastore job <= 1.1 x curl.
* export only (files kept, SHA-256 recorded): the provider's export (transport
  datastore, method vmdk) against `curl | tee FILE | openssl dgst -sha256` per disk in
  parallel. Target: throughput >= 0.9 of the curls'.

Prints every figure (medians). Also times one listing of 1,000 VMs (a second simulator
with 500 VMs per resource pool).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config  # noqa: E402
from core.models import ExportOptions, VMFilter  # noqa: E402
from providers import get_provider  # noqa: E402
from tests.peers import peers_and_daemon, wait_for_job  # noqa: E402
from tests.vsphere_sim import PASSWORD, USER, Vcsim, create_vm, start_vcsim  # noqa: E402

MIB = 1 << 20


def write_flat_disk(folder: Path, name: str, size_mib: int, *, random_mib: int | None = None,
                    ) -> None:
    """`name.vmdk` (descriptor) + `name-flat.vmdk` (the bytes), as ESXi writes them: the
    first `random_mib` (default all) random, the rest zeros."""
    block = os.urandom(64 * MIB)
    with (folder / f"{name}-flat.vmdk").open("wb") as flat:
        for _ in range((size_mib if random_mib is None else random_mib) // 64):
            flat.write(block)
        flat.truncate(size_mib * MIB)
    sectors = size_mib * MIB // 512
    (folder / f"{name}.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="vmfs"\n\n# Extent description\n'
        f'RW {sectors} VMFS "{name}-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "14"\n')


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def curls(urls: list[str], folder: Path, *, hashed: bool) -> float:
    """Two parallel downloads to files (piped through openssl's SHA-256 when `hashed`)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.monotonic()
    processes = [subprocess.Popen(
        f"curl -sSfk '{url}' | tee {folder / str(i)} | openssl dgst -sha256 >/dev/null"
        if hashed else f"curl -sSfk -o {folder / str(i)} '{url}'", shell=True)
        for i, url in enumerate(urls)]
    assert all(p.wait() == 0 for p in processes)
    elapsed = time.monotonic() - started
    shutil.rmtree(folder)
    return elapsed


def migrate(client: Any, vm_id: str, transport: str, exports: Path) -> tuple[float, float, int]:
    """One migrate-vm job: seconds submit → completed, its stream step's seconds, and the
    export folder's peak size meanwhile."""
    os.sync()
    started = time.monotonic()
    answer = client.post("/jobs/submit", json={
        "vm_identifier": vm_id, "provider": "vsphere", "options": {"transport": transport},
        "hyper2kvm_integration": {"replace_existing": True, "convert_guest": False,
                                  "verify_boot": "off"}})
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["job_id"]
    peak = 0
    while True:
        peak = max(peak, folder_bytes(exports))
        info = client.get("/jobs/query", params={"job_id": job_id}).json()
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    info = wait_for_job(client, job_id)
    assert info["status"] == "completed", info["error"]
    assert info["result"]["export"]["streamed"], "the job did not stream"
    return elapsed, info["result"]["step_seconds"]["stream"], peak


def migration_case(server: Vcsim, si: Any, args: argparse.Namespace, work: Path) -> None:
    datastore = Path(server.datastores["LocalDS_0"])
    half = args.disk_mib // 2
    flat_vm = create_vm(si, "bench-flat", disks_mib=[args.disk_mib, args.disk_mib])
    stream_vm = create_vm(si, "bench-nfc", disks_mib=[args.disk_mib, args.disk_mib])
    names = ["bench-flat", "bench-flat_1"]
    for name in names:
        write_flat_disk(datastore / "bench-flat", name, args.disk_mib, random_mib=half)
    for name, target in zip(names, ["bench-nfc", "bench-nfc_1"], strict=True):
        subprocess.run(["qemu-img", "convert", "-q", "-f", "vmdk", "-O", "vmdk", "-o",
                        "subformat=streamOptimized", str(datastore / "bench-flat" / f"{name}.vmdk"),
                        str(datastore / "bench-nfc" / f"{target}.vmdk")], check=True)
    urls = [f"https://{server.host}/folder/bench-flat/{n}-flat.vmdk?dcPath=DC0"
            f"&dsName=LocalDS_0" for n in names]
    total = 2 * args.disk_mib * MIB
    with peers_and_daemon("bench-vsphere", api_key="bench-key",
                          vsphere=server.host) as daemon:
        client = daemon.client()
        migrate(client, flat_vm._moId, "datastore", daemon.exports)  # warm: flows loaded
        jobs: dict[str, list[float]] = {"datastore": [], "nfc": []}
        steps: dict[str, list[float]] = {"datastore": [], "nfc": []}
        peaks: list[int] = []
        plain: list[float] = []
        for round_ in range(args.rounds):
            for transport, vm in (("datastore", flat_vm), ("nfc", stream_vm)):
                seconds, step, peak = migrate(client, vm._moId, transport, daemon.exports)
                jobs[transport].append(seconds)
                steps[transport].append(step)
                peaks.append(peak)
            plain.append(curls(urls, work / "curl", hashed=False))
            print(f"round {round_ + 1}: job datastore {jobs['datastore'][-1]:.2f} s "
                  f"(stream {steps['datastore'][-1]:.2f} s), job nfc {jobs['nfc'][-1]:.2f} s "
                  f"(stream {steps['nfc'][-1]:.2f} s), curl x2 {plain[-1]:.2f} s", flush=True)
    curl = statistics.median(plain)
    print(f"migration of 2 x {args.disk_mib} MiB (half random, half zeros), median of "
          f"{args.rounds}:")
    for transport in ("datastore", "nfc"):
        job, step = statistics.median(jobs[transport]), statistics.median(steps[transport])
        print(f"  migrate-vm job, {transport:9s}  {job:6.2f} s  {total / MIB / job:6.0f} MiB/s"
              f"   (stream step {step:.2f} s)   job/curl {job / curl:.2f}")
    print(f"  curl x2 to files            {curl:6.2f} s  {total / MIB / curl:6.0f} MiB/s")
    print("  target: datastore job <= 1.1 x curl")
    print(f"  export folder peak size during the jobs: {max(peaks)} bytes")


def export_case(server: Vcsim, si: Any, args: argparse.Namespace, work: Path) -> None:
    vm = create_vm(si, "bench-vm", disks_mib=[args.disk_mib, args.disk_mib])
    folder = Path(server.datastores["LocalDS_0"]) / "bench-vm"
    names = ["bench-vm", "bench-vm_1"]
    for name in names:
        write_flat_disk(folder, name, args.disk_mib, random_mib=args.disk_mib // 2)
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
    hashed: list[float] = []
    peaks: list[int] = []
    for round_ in range(args.rounds):
        dest = work / "export"
        shutil.rmtree(dest, ignore_errors=True)
        started = time.monotonic()
        result = provider.export(vm._moId, dest, method="vmdk",
                                 options=ExportOptions(transport="datastore"))
        ours.append(time.monotonic() - started)
        assert sum(f.size for f in result.files if f.role == "other") == total
        peaks.append(folder_bytes(dest))
        shutil.rmtree(dest)
        hashed.append(curls(urls, work / "curl", hashed=True))
        print(f"round {round_ + 1}: provider {ours[-1]:.2f} s, curl | tee | openssl "
              f"{hashed[-1]:.2f} s", flush=True)
    mine, theirs = statistics.median(ours), statistics.median(hashed)
    print(f"export only (files kept, SHA-256) of 2 x {args.disk_mib} MiB, median of "
          f"{args.rounds}:")
    print(f"  provider (datastore, hashed)       {mine:6.2f} s  {total / MIB / mine:6.0f} MiB/s")
    print(f"  curl | tee | openssl dgst x2       {theirs:6.2f} s  "
          f"{total / MIB / theirs:6.0f} MiB/s")
    print(f"  throughput ratio provider/curl: {theirs / mine:.2f} (target >= 0.9); "
          f"export folder {max(peaks)} bytes on disk (zeros left as holes)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=1024)
    args = parser.parse_args()

    server = start_vcsim("nfc")
    work = Path(tempfile.mkdtemp(prefix="bench-vsphere-", dir="/var/tmp"))
    try:
        si = server.connect()
        migration_case(server, si, args, work)
        export_case(server, si, args, work)
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
