"""The REST API under load: how fast jobs are answered while many run.

Starts a Prefect server and hypervisord (as the tests do) and fills Prefect with 1,000
finished migrate-vm jobs and 20 running ones; the running ones write progress labels
twice a second each, as real jobs' progress writers do (the bytes they would move are not
simulated: on 2 cores real conversions would also take CPU from the API). Then, from one
bounded load generator on loopback:
  (a) GET /jobs/query?job_id= of finished jobs at 200 req/s for 15 s;
  (b) GET /jobs/query?limit=50 (a page of 50 jobs) at 20 req/s for 15 s;
  (c) 50 POST /jobs/submit at once (50 different VMs).
Prints p50/p99 of each. Targets: (a) p99 < 50 ms, (b) p99 < 200 ms, (c) p99 < 1 s.
Run: .venv/bin/python bench/api_load.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import peers_and_daemon  # noqa: E402 - sets Prefect's environment first

FINISHED, RUNNING, SUBMITS = 1000, 20, 50


def fill_prefect(job: dict[str, Any]) -> tuple[list[str], list[str]]:
    """1,000 finished and 20 running migrate-vm runs; returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("migrate-vm/hypervisord").id
        finished = [str(client.create_flow_run_from_deployment(
            deployment, parameters={"job": job}, tags=["hypersdk", "bench"],
            state=Completed()).id) for _ in range(FINISHED)]
        running = [str(client.create_flow_run_from_deployment(
            deployment, parameters={"job": job}, tags=["hypersdk", "bench"],
            state=Running()).id) for _ in range(RUNNING)]
    return finished, running


def write_progress(running: list[str], stop: threading.Event) -> None:
    """Each running job's labels, twice a second, as tasks/progress.py writes them."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        step = 0
        while not stop.is_set():
            step += 1
            for run_id in running:
                client.update_flow_run_labels(UUID(run_id), {
                    "hypersdk.phase": "convert", "hypersdk.percentage": step % 100,
                    "hypersdk.bytes_done": step * 2**20, "hypersdk.updated_at": time.time()})
            stop.wait(max(0.0, 0.5 - 0.001 * len(running)))


async def paced(client: httpx.AsyncClient, paths: list[str], rate: float,
                seconds: float) -> list[float]:
    """GET `paths` round-robin at `rate` requests/s for `seconds`; each one's latency."""
    latencies: list[float] = []

    async def one(path: str) -> None:
        started = time.perf_counter()
        answer = await client.get(path)
        latencies.append(time.perf_counter() - started)
        answer.raise_for_status()

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(paths[i % len(paths)])))
    await asyncio.gather(*tasks)
    return latencies


def percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
            f"({len(ordered)} requests)")


async def measure(url: str, key: str, finished: list[str], vms: list[str]) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=60,
                                 limits=limits) as client:
        paths = [f"/jobs/query?job_id={job_id}" for job_id in finished]
        await paced(client, paths[:50], 50, 2)  # warm-up
        queried = await paced(client, paths, 200, 15)
        print(f"(a) /jobs/query?job_id= of finished jobs at 200 req/s: {percentiles(queried)}"
              "   target p99 < 50 ms", flush=True)
        pages = await paced(client, ["/jobs/query?limit=50"], 20, 15)
        print(f"(b) a page of 50 jobs at 20 req/s: {percentiles(pages)}   target p99 < 200 ms",
              flush=True)

        async def submit(vm: str) -> float:
            started = time.perf_counter()
            answer = await client.post("/jobs/submit", json={
                "vm_identifier": vm, "hyper2kvm_integration": {"enabled": False}})
            answer.raise_for_status()
            return time.perf_counter() - started

        submits = await asyncio.gather(*(submit(vm) for vm in vms))
        print(f"(c) {SUBMITS} submits at once: {percentiles(list(submits))}   target p99 < 1 s",
              flush=True)


def main() -> None:
    from tests.helpers import make_random_raw

    with peers_and_daemon("load", api_key="load", extra_daemon="  shutdown_grace: 1s\n") as daemon:
        daemon.inbox.mkdir(parents=True, exist_ok=True)
        vms = [f"load-{i}" for i in range(SUBMITS)]
        for vm in vms:
            make_random_raw(daemon.inbox, vm, 1)
        job = {"vm_identifier": "history", "provider": "local"}
        print(f"creating {FINISHED} finished and {RUNNING} running jobs", flush=True)
        finished, running = fill_prefect(job)
        stop = threading.Event()
        writer = threading.Thread(target=write_progress, args=(running, stop), daemon=True)
        writer.start()
        try:
            asyncio.run(measure(daemon.url, "load", finished, vms))
        finally:
            stop.set()
            writer.join()


if __name__ == "__main__":
    main()
