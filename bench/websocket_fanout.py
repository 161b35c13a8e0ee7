"""Websocket fan-out: many clients following many concurrent jobs.

Starts a Prefect server and hypervisord (as the tests do), connects --clients websocket
clients, submits --jobs export-only jobs of small sample VMs at once, and records, for
every job event each client receives, the delay from the event (the state change or
progress update, as Prefect timestamps it) to the client's receipt. Prints p50/p99 of
that delay for state changes and for all events, how many messages were delivered, and
the daemon's CPU over the run. Target: p99 < 500 ms.
Run: .venv/bin/python bench/websocket_fanout.py [--clients 200] [--jobs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyper2kvm.sample import make_sample_ova  # noqa: E402
from tests.peers import (  # noqa: E402 - sets Prefect's environment before Prefect loads
    peers_and_daemon,
    wait_for_job,
)

TERMINAL = ("job.completed", "job.failed", "job.cancelled")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


async def follow(url: str, key: str, jobs: set[str], done: asyncio.Event,
                 delays: list[tuple[str, float]], ready: asyncio.Event,
                 counter: list[int]) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                       max_queue=None) as client:
        await client.recv()  # the snapshot
        counter[0] += 1
        if counter[0] == counter[1]:
            ready.set()
        finished: set[str] = set()
        while not done.is_set():
            try:
                raw = await asyncio.wait_for(client.recv(), timeout=1)
            except TimeoutError:
                continue
            received = time.time()
            message = json.loads(raw)
            if message.get("type") != "job" or "timestamp" not in message:
                continue
            occurred = datetime.fromisoformat(message["timestamp"]).timestamp()
            delays.append((message["event"], received - occurred))
            if message["event"] in TERMINAL and message["job_id"] in jobs:
                finished.add(message["job_id"])
                if finished >= jobs:
                    return


async def run(args: argparse.Namespace, daemon: object, names: list[str]) -> None:
    import httpx

    url = daemon.url.replace("http://", "ws://") + "/websocket"  # type: ignore[attr-defined]
    key = daemon.api_key  # type: ignore[attr-defined]
    delays: list[tuple[str, float]] = []
    jobs: set[str] = set()
    done, ready = asyncio.Event(), asyncio.Event()
    counter = [0, args.clients]
    clients = [asyncio.create_task(follow(url, key, jobs, done, delays, ready, counter))
               for _ in range(args.clients)]
    await asyncio.wait_for(ready.wait(), timeout=120)
    print(f"{args.clients} clients connected", flush=True)
    pid = daemon.process.pid  # type: ignore[attr-defined]
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    async with httpx.AsyncClient(base_url=daemon.url,  # type: ignore[attr-defined]
                                 headers={"Authorization": f"Bearer {key}"}) as api:
        for name in names:
            answer = await api.post("/jobs/submit", json={
                "vm_identifier": name, "export_path": f"fanout-{name}",
                "hyper2kvm_integration": {"enabled": False}})
            answer.raise_for_status()
            jobs.add(answer.json()["job_id"])
    try:
        await asyncio.wait_for(asyncio.gather(*clients), timeout=900)
    finally:
        done.set()
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    with httpx.Client(base_url=daemon.url,  # type: ignore[attr-defined]
                      headers={"Authorization": f"Bearer {key}"}) as api:
        statuses = [wait_for_job(api, job)["status"] for job in jobs]
    states = [d for event, d in delays if event != "job.progress"]
    every = [d for _, d in delays]
    print(f"{len(jobs)} jobs ({statuses.count('completed')} completed) followed by "
          f"{args.clients} clients in {elapsed:.1f} s; {len(every)} messages received")
    for label, values in (("state changes", states), ("all job events", every)):
        print(f"  {label:15s} n={len(values):6d}  p50 {statistics.median(values) * 1000:6.0f} ms"
              f"  p99 {percentile(values, 0.99) * 1000:6.0f} ms  max {max(values) * 1000:6.0f}"
              " ms")
    print(f"  daemon CPU: {cpu:.1f} s over {elapsed:.1f} s ({100 * cpu / elapsed:.0f}% of one "
          f"core); target p99 < 500 ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    with peers_and_daemon("fanout", api_key="bench-key") as daemon:
        names = [f"fanout-{i}" for i in range(args.jobs)]
        for name in names:
            make_sample_ova(daemon.inbox, name, size_mib=8)
        asyncio.run(run(args, daemon, names))

if __name__ == "__main__":
    main()
