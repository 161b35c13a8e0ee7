"""Scale-out: jobs per minute through one conversion host and through two.

Prefect's own server on a private PostgreSQL cluster, `hypervisord deploy` with
daemon.workers 4, `hypervisord --no-serve` as the API and conversion hosts as `hypervisord
worker --limit 2` (tests/pool_peers.py, as the tests have them). 16 local VMs of 64 MiB
(qcow2 outputs, host b's config: uncompressed) go through host b alone, then 16 others
through hosts a and b, on the same server in the same run. Prints jobs per minute for each,
their ratio (target: two hosts >= 1.7x one) and the submit→running latency p50/p95 (the
time from a job's creation until its run starts; target p95 < 5 s). On one machine both
"hosts" share its cores: the ratio is what the pool's scheduling allows there, not what
two machines would reach.
Run: .venv/bin/python bench/scaleout.py [--jobs 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import (  # noqa: E402 - sets Prefect's environment first
    SESSION_DIR,
    libvirt_uri,
    unique,
    wait_until,
)
from tests.pool_peers import Host, Pool, running_pool  # noqa: E402


def run_jobs(pool: Pool, hosts: list[Host], count: int, *, one_by_one: bool = False
             ) -> tuple[float, list[float]]:
    """Submit `count` jobs (at once, or each when the one before has finished) with `hosts`
    serving the pool; returns the seconds until the last finished and each job's
    submit→running latency."""
    from hyper2kvm.sample import make_sample_ova

    vms = [unique("bench") for _ in range(count)]
    for vm in vms:
        make_sample_ova(pool.inbox, vm, size_mib=64)

    def finished(jobs: list[str]) -> bool:
        answers = [pool.api.get("/jobs/query", params={"job_id": job}).json() for job in jobs]
        return all(a["status"] in ("completed", "failed") for a in answers)

    with pool.workers(*hosts):
        started = time.monotonic()
        jobs: list[str] = []
        for vm in vms:
            jobs.append(pool.submit(vm))
            if one_by_one:
                wait_until(lambda: finished(jobs[-1:]), timeout=600, interval=0.2,
                           what="the job")
        wait_until(lambda: finished(jobs), timeout=1800, interval=0.5, what="the jobs")
        elapsed = time.monotonic() - started
    runs = pool.rest("POST", "/flow_runs/filter",
                     json={"flow_runs": {"id": {"any_": jobs}}}).json()
    failed = [run["name"] for run in runs if run["state"]["type"] != "COMPLETED"]
    if failed:
        raise SystemExit(f"jobs failed: {failed}")
    latency = [(datetime.fromisoformat(run["start_time"])
                - datetime.fromisoformat(run["created"])).total_seconds() for run in runs]
    return elapsed, latency


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=16)
    args = parser.parse_args()
    uri = libvirt_uri.__wrapped__()  # type: ignore[attr-defined]
    next(uri)
    try:
        with running_pool(SESSION_DIR / "bench-pool", pool_limit=4) as pool:
            # both hosts convert alike here (the tests' host a compresses)
            pool.a.config.write_text(pool.b.config.read_text().replace(
                str(pool.b.root), str(pool.a.root)))
            one, one_latency = run_jobs(pool, [pool.b], args.jobs)
            two, two_latency = run_jobs(pool, [pool.a, pool.b], args.jobs)
            _, idle_latency = run_jobs(pool, [pool.a, pool.b], 8, one_by_one=True)
    finally:
        next(uri, None)
    for label, seconds, latency in (("one host (limit 2)", one, one_latency),
                                    ("two hosts (limit 2 each)", two, two_latency)):
        print(f"{label:26s} {args.jobs} jobs at once: {seconds:6.1f} s = "
              f"{args.jobs * 60 / seconds:5.1f} jobs/min; submit→running (queue included) "
              f"p50 {statistics.median(latency):5.2f} s, p95 {percentile(latency, 0.95):5.2f} s")
    print(f"two hosts / one host: {one / two:.2f}x (target >= 1.7x)")
    print(f"submit→running with a free slot (8 jobs one by one): p50 "
          f"{statistics.median(idle_latency):.2f} s, p95 {percentile(idle_latency, 0.95):.2f} s "
          "(target p95 < 5 s)")


if __name__ == "__main__":
    main()
