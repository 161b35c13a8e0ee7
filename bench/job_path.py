"""What the orchestration costs on top of the work itself.

Starts a Prefect server and hypervisord (as the tests do), builds sample OVAs (16 MiB;
256 MiB and 2 GiB that are half random data, half zeros, streamOptimized VMDKs), then
alternates, several rounds:
  * a job through the REST API, submit → completed (export, transfer, convert, register);
  * bare `qemu-img convert` of the same VMDK to the same output format.
Prints (a) the fixed overhead: submit → completed for the 16 MiB VM; (b) the marginal cost:
(job(2 GiB) - job(256 MiB)) / (qemu-img(2 GiB) - qemu-img(256 MiB)).
Targets: (a) <= 6 s, (b) <= 1.25. Run: .venv/bin/python bench/job_path.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyper2kvm import ova  # noqa: E402
from hyper2kvm.sample import make_sample_ova  # noqa: E402
from tests.peers import (  # noqa: E402 - sets Prefect's environment before Prefect loads
    SESSION_DIR,
    peers_and_daemon,
    wait_for_job,
)


def job_seconds(client, name: str) -> float:  # type: ignore[no-untyped-def]
    os.sync()  # no earlier run's writeback inside this one
    started = time.monotonic()
    answer = client.post("/jobs/submit", json={
        "vm_identifier": name, "export_path": f"bench-{name}",
        "hyper2kvm_integration": {"replace_existing": True}})
    answer.raise_for_status()
    info = wait_for_job(client, answer.json()["job_id"], timeout=900)
    elapsed = time.monotonic() - started
    if info["status"] != "completed":
        raise SystemExit(f"job for {name} ended {info['status']}: {info['error']}")
    steps = info["result"]["step_seconds"]
    print(f"  {name}: {elapsed:.2f}s; steps " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
          + f"; run {_run_seconds(info):.2f}s", flush=True)
    return elapsed


def _run_seconds(info: dict) -> float:
    from datetime import datetime

    start, end = (datetime.fromisoformat(info[k]) for k in ("started_at", "finished_at"))
    return (end - start).total_seconds()


def qemu_img_seconds(vmdk: Path, target: Path) -> float:
    """Bare qemu-img, its output kept (and replaced next time) as a job's is: deleting it at
    once would spare it the writeback a job's output pays."""
    os.sync()
    partial = target.with_name(f".{target.name}.partial")
    started = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(vmdk), str(partial)], check=True)
    os.replace(partial, target)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with peers_and_daemon("bench", api_key="bench") as daemon:
        inbox = daemon.inbox
        inbox.mkdir(parents=True, exist_ok=True)
        sizes = {"b16": (16, 4), "b256": (256, 128), "b2048": (2048, 1024)}
        vmdks: dict[str, Path] = {}
        scratch = Path(tempfile.mkdtemp(dir=SESSION_DIR))
        for name, (size, random_mib) in sizes.items():
            print(f"building {name}: {size} MiB disk, {random_mib} MiB random", flush=True)
            path = make_sample_ova(inbox, name, size_mib=size, random_mib=random_mib)
            members = ova.read_members(path)
            member = next(m for n, m in members.items() if n.endswith(".vmdk"))
            vmdks[name] = scratch / f"{name}.vmdk"
            ova.extract_member(path, member, vmdks[name])
        times: dict[str, list[float]] = {f"{k}/{kind}": [] for k in sizes
                                         for kind in ("job", "qemu")}
        with daemon.client() as client:
            job_seconds(client, "b16")  # warm-up: first run imports, first libvirt connection
            for round_ in range(args.rounds):
                for name in sizes:
                    times[f"{name}/job"].append(job_seconds(client, name))
                    times[f"{name}/qemu"].append(qemu_img_seconds(vmdks[name],
                                                                  scratch / f"{name}.qcow2"))
                print(f"round {round_ + 1}: " + ", ".join(
                    f"{k}={v[-1]:.2f}s" for k, v in times.items()), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        fixed = med["b16/job"]
        marginal = (med["b2048/job"] - med["b256/job"]) / (med["b2048/qemu"] - med["b256/qemu"])
        print()
        print(f"(a) fixed overhead, submit -> completed, 16 MiB VM: {fixed:.2f} s "
              f"(bare qemu-img {med['b16/qemu']:.2f} s)   target <= 6 s")
        job_extra = med["b2048/job"] - med["b256/job"]
        qemu_extra = med["b2048/qemu"] - med["b256/qemu"]
        print(f"(b) marginal cost, 2 GiB over 256 MiB: job +{job_extra:.2f} s, qemu-img "
              f"+{qemu_extra:.2f} s -> ratio {marginal:.2f}   target <= 1.25")


if __name__ == "__main__":
    main()
