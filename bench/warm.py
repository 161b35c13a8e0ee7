"""Warm against cold migration of one vSphere VM, from the vCenter simulator with Changed
Block Tracking (tests/vcsim/cbt.go.in).

The VM has one --disk-mib disk stored flat, half random data, half zeros. Per round:

* cold: the VM powered off, a migrate-vm job (datastore transport, one pass into qcow2),
  submit → completed: the whole migration is downtime;
* warm: the VM powered on, a warm job (CBT turned on by the job); once its precopy is in,
  --changed-percent of the disk is rewritten in 1 MiB pieces at random offsets (what the
  running guest does), then the cutover: the VM powered off, the changed areas read, the
  domain defined. Its downtime is the result's `downtime_seconds` (the last round's start to
  the domain defined); the copy is compared with the disk at cutover (qemu-img compare).

Guest conversion and the boot check are off in both. Prints the medians and the ratio
downtime / cold (target <= 0.2).
Run: .venv/bin/python bench/warm.py [--rounds 1] [--disk-mib 2048] [--changed-percent 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyVim.task import WaitForTask  # noqa: E402

from bench.vsphere_export import write_flat_disk  # noqa: E402
from hyper2kvm import qemu_img  # noqa: E402
from tests.peers import peers_and_daemon, wait_for_job, wait_until  # noqa: E402
from tests.vsphere_sim import create_vm, start_vcsim  # noqa: E402

MIB = 1 << 20
H2K = {"replace_existing": True, "convert_guest": False, "verify_boot": "off"}


def finished(client: Any, job_id: str) -> dict[str, Any]:
    info = wait_for_job(client, job_id, timeout=3600)
    assert info["status"] == "completed", info["error"]
    return info


def cold(client: Any, vm: Any) -> float:
    if vm.runtime.powerState != "poweredOff":
        WaitForTask(vm.PowerOffVM_Task())
    started = time.monotonic()
    answer = client.post("/jobs/submit", json={
        "vm_identifier": vm._moId, "provider": "vsphere",
        "options": {"transport": "datastore"}, "hyper2kvm_integration": H2K})
    assert answer.status_code == 200, answer.text
    finished(client, answer.json()["job_id"])
    return time.monotonic() - started


def rewrite(flat: Path, size: int, percent: float) -> int:
    """`percent` of the disk rewritten with new random bytes, 1 MiB at a time."""
    pieces = int(size * percent / 100) // MIB
    with flat.open("r+b") as disk:
        for offset in random.sample(range(size // MIB), pieces):
            disk.seek(offset * MIB)
            disk.write(os.urandom(MIB))
    return pieces * MIB


def warm(client: Any, vm: Any, flat: Path, size: int, percent: float) -> dict[str, float]:
    if vm.runtime.powerState != "poweredOn":
        WaitForTask(vm.PowerOnVM_Task())
    started = time.monotonic()
    answer = client.post("/jobs/submit", json={
        "vm_identifier": vm._moId, "provider": "vsphere", "hyper2kvm_integration": H2K,
        "options": {"warm": True, "enable_cbt": True, "precopy_interval": 3600}})
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["job_id"]
    wait_until(lambda: client.get(f"/jobs/progress/{job_id}").json()["status"] == "waiting",
               timeout=3600, interval=0.2, what="the precopy")
    precopy = time.monotonic() - started
    changed = rewrite(flat, size, percent)
    asked = time.monotonic()
    assert client.post("/jobs/cutover", json={"job_id": job_id}).status_code == 200
    info = finished(client, job_id)
    wall = time.monotonic() - asked
    assert qemu_img.compare(flat, Path(info["result"]["disks"][0]["path"])), \
        "the copy is not the disk at cutover"
    last = info["result"]["warm"]["rounds"][-1]
    assert last["changed_bytes"] >= changed, last
    return {"precopy": precopy, "downtime": info["result"]["warm"]["downtime_seconds"],
            "cutover_wall": wall, "last_round_bytes": last["changed_bytes"],
            "last_round": last["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--disk-mib", type=int, default=2048)
    parser.add_argument("--changed-percent", type=float, default=5.0)
    args = parser.parse_args()

    server = start_vcsim("nfc")
    try:
        si = server.connect()
        vm = create_vm(si, "bench-warm", disks_mib=[args.disk_mib])
        folder = Path(server.datastores["LocalDS_0"]) / "bench-warm"
        write_flat_disk(folder, "bench-warm", args.disk_mib, random_mib=args.disk_mib // 2)
        flat, size = folder / "bench-warm-flat.vmdk", args.disk_mib * MIB
        with peers_and_daemon("bench-warm", api_key="bench-key",
                              vsphere=server.host) as daemon:
            client = daemon.client()
            cold(client, vm)  # the flows loaded once, as on a daemon that has run a job
            colds: list[float] = []
            warms: list[dict[str, float]] = []
            for round_ in range(args.rounds):
                colds.append(cold(client, vm))
                warms.append(warm(client, vm, flat, size, args.changed_percent))
                print(f"round {round_ + 1}: cold {colds[-1]:.2f} s; warm precopy "
                      f"{warms[-1]['precopy']:.2f} s, downtime {warms[-1]['downtime']:.2f} s "
                      f"(cutover asked → completed {warms[-1]['cutover_wall']:.2f} s; the last "
                      f"round {warms[-1]['last_round']:.2f} s for "
                      f"{warms[-1]['last_round_bytes'] / MIB:.0f} MiB)", flush=True)
    finally:
        server.stop()
    cold_s = statistics.median(colds)
    down = statistics.median(w["downtime"] for w in warms)
    print(f"one VM, a {args.disk_mib} MiB disk (half random), {args.changed_percent:g} % "
          f"rewritten after the precopy, median of {args.rounds}:")
    print(f"  cold migration (all downtime)   {cold_s:7.2f} s")
    print(f"  warm precopy (VM running)       "
          f"{statistics.median(w['precopy'] for w in warms):7.2f} s")
    print(f"  warm downtime                   {down:7.2f} s")
    print(f"  downtime / cold: {down / cold_s:.2f} (target <= 0.2)")


if __name__ == "__main__":
    main()
