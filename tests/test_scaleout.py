"""Scale-out on a Prefect work pool: Prefect's own server on a private PostgreSQL cluster,
`hypervisord deploy`, conversion hosts as `hypervisord worker` processes with their own
folders, and `hypervisord --no-serve` as the API (tests/pool_peers.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyper2kvm.sample import make_sample_ova
from tests.helpers import domain_defined
from tests.peers import (
    BIN,
    SESSION_DIR,
    unique,
    wait_for_job,
    wait_until,
)
from tests.pool_peers import Pool, end_group, hypervisord, kill_host, running_pool

POOL_LIMIT = 3  # daemon.workers of the deploying config: runs at once across the pool


@pytest.fixture(scope="module")
def pool(libvirt_uri: str) -> Iterator[Pool]:
    with running_pool(SESSION_DIR / "pool", pool_limit=POOL_LIMIT) as made:
        yield made


def test_deploy_refuses_what_would_leave_workers_guessing(pool: Pool, tmp_path: Path) -> None:
    no_results = tmp_path / "config.yaml"
    no_results.write_text(pool.deployer.read_text().split("pool:\n")[0])
    refused = hypervisord("deploy", "--config", str(no_results), env=pool.server.env())
    assert refused.returncode == 1
    assert "pool.results is not set" in refused.stderr
    no_block = tmp_path / "no-block.yaml"
    no_block.write_text(pool.deployer.read_text().replace(
        f'results: "{pool.shared / "results"}"', 'results: "local-file-system/nowhere"'))
    refused = hypervisord("deploy", "--config", str(no_block), env=pool.server.env())
    assert refused.returncode == 1
    assert "cannot load the storage block 'local-file-system/nowhere'" in refused.stderr
    no_server = {k: v for k, v in pool.server.env().items() if k != "PREFECT_API_URL"}
    refused = hypervisord("deploy", "--config", str(pool.deployer), env=no_server)
    assert refused.returncode == 1 and "PREFECT_API_URL is not set" in refused.stderr


def test_a_worker_started_without_a_config_fails_its_job_saying_so(pool: Pool) -> None:
    """What `prefect worker start` alone on a host gives: the run refuses to fall back on
    the built-in defaults (before, it looked for the VM in /var/lib/hypersdk/inbox)."""
    vm = unique("bare")
    make_sample_ova(pool.inbox, vm, size_mib=8)
    log = pool.shared / "bare-worker.log"
    bare = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "hypersdk", "--limit", "1",
         "--name", "bare"],
        env=pool.server.env(PREFECT_WORKER_QUERY_SECONDS="1"), stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = wait_for_job(pool.api, pool.submit(vm), timeout=120)
    finally:
        end_group(bare, timeout=60)  # a worker still up would take the next tests' jobs
    assert info["status"] == "failed"
    assert "HYPERSDK_CONFIG is not set" in info["error"], info["error"]
    assert "hypervisord worker --config" in info["error"]


def test_results_may_live_in_a_storage_block(pool: Pool, tmp_path: Path) -> None:
    """pool.results as a block's slug: the runs write there, the API reads from there."""
    folder = pool.shared / "block-results"
    folder.mkdir()
    made = subprocess.run(
        [sys.executable, "-c", "from prefect.filesystems import LocalFileSystem; "
         f"LocalFileSystem(basepath={str(folder)!r}).save('shared', overwrite=True)"],
        env=pool.server.env(), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    config = tmp_path / "config.yaml"
    config.write_text(pool.deployer.read_text().replace(
        f'results: "{pool.shared / "results"}"', 'results: "local-file-system/shared"'))
    default_results = set((pool.shared / "results").iterdir())
    vm = unique("in-block")
    make_sample_ova(pool.inbox, vm, size_mib=8)
    try:
        deployed = hypervisord("deploy", "--config", str(config), env=pool.server.env())
        assert deployed.returncode == 0, deployed.stderr
        with pool.workers(pool.b):
            info = wait_for_job(pool.api, pool.submit(vm), timeout=180)
    finally:
        assert hypervisord("deploy", "--config", str(pool.deployer),
                           env=pool.server.env()).returncode == 0
    assert info["status"] == "completed", info["error"]
    assert info["result"]["domain_name"] == vm  # read back from the block's folder
    assert any(folder.iterdir())
    assert set((pool.shared / "results").iterdir()) == default_results


@pytest.mark.timeout(600 + 120)  # its eight jobs may take their 600 s
def test_eight_jobs_spread_over_two_hosts_within_the_pools_limit(pool: Pool) -> None:
    vms = [unique("spread") for _ in range(8)]
    for vm in vms:
        make_sample_ova(pool.inbox, vm, size_mib=32)
    running_seen: list[int] = []
    with pool.workers(pool.a, pool.b):
        jobs = [pool.submit(vm) for vm in vms]

        def all_done() -> bool:
            page = pool.api.get("/jobs/query", params={"status": "running", "limit": 200})
            running_seen.append(sum(1 for job in page.json()["jobs"] if job["job_id"] in jobs))
            return all(pool.api.get("/jobs/query", params={"job_id": job}).json()["status"]
                       in ("completed", "failed") for job in jobs)

        wait_until(all_done, timeout=600, interval=0.5, what="eight jobs")
    infos = [wait_for_job(pool.api, job) for job in jobs]
    assert [info["status"] for info in infos] == ["completed"] * 8, [i["error"] for i in infos]
    # each host converted into its own folder; together exactly the eight VMs
    on_a = [vm for vm in vms if pool.a.disks(vm)]
    on_b = [vm for vm in vms if pool.b.disks(vm)]
    assert on_a and on_b, f"one host did everything: a={on_a} b={on_b}"
    assert sorted(on_a + on_b) == sorted(vms)
    for vm, info in zip(vms, infos, strict=True):
        # the API host reads the result the worker stored in the shared results folder
        assert info["result"] is not None, f"no result for {vm}"
        assert info["result"]["domain_name"] == vm and domain_defined(vm)
        host = pool.a if vm in on_a else pool.b
        assert info["result"]["disks"][0]["path"] == str(host.images / vm / f"{vm}-disk1.qcow2")
    # two workers could start four, the pool's queue lets three run at once
    assert max(running_seen) <= POOL_LIMIT, running_seen


def _task_states(pool: Pool, job_id: str, name: str) -> list[str]:
    runs = pool.rest("POST", "/task_runs/filter",
                     json={"flow_runs": {"id": {"any_": [job_id]}}}).json()
    return [run["state"]["name"] for run in runs if run["task_key"].startswith(name)
            or run["name"].startswith(f"{name}-")]


def test_a_dead_host_is_crashed_and_its_job_finishes_on_another(pool: Pool) -> None:
    """Host a dies while converting two VMs: one job is left alone (Crashed, then retried on
    host b), the other is cancelled while no process can hear it (Cancelled)."""
    dies, cancelled = unique("dies"), unique("dies-cancel")
    for vm in (dies, cancelled):
        # incompressible data, compressed by host a: its conversions take a while
        make_sample_ova(pool.inbox, vm, size_mib=320, random_mib=256)
    with pool.workers(pool.a):
        job, other = pool.submit(dies), pool.submit(cancelled)
        wait_until(lambda: all(any(pool.a.images.glob(f"{vm}/.*.partial"))
                               for vm in (dies, cancelled)), timeout=180, interval=0.1,
                   what="host a converting both")
        kill_host(pool.a)
    left = {vm: sorted(p.name for p in (pool.a.images / vm).glob(".*.partial"))
            for vm in (dies, cancelled)}
    assert all(left.values()), f"the kill came after a conversion: {left}"
    answer = pool.api.post("/jobs/cancel", json={"job_id": other}).json()
    assert answer["status"] == "cancelling", answer
    # no process of host a is left to say so: Prefect's automations do
    info = wait_for_job(pool.api, job, timeout=2 * 30 + 90,
                        statuses=("failed", "completed", "cancelled"))
    assert info["status"] == "failed" and "heartbeat" in info["error"], info

    def state(job_id: str) -> str:
        return str(pool.rest("GET", f"/flow_runs/{job_id}").json()["state"]["type"])

    wait_until(lambda: state(other) == "CANCELLED", timeout=2 * 30 + 60, interval=1,
               what="the cancel finished by the server")
    assert "did not confirm" in pool.api.get("/jobs/query", params={"job_id": other}).json()[
        "error"]
    with pool.workers(pool.b):
        assert pool.api.post("/jobs/retry", json={"job_id": job}).status_code == 200
        info = wait_for_job(pool.api, job, timeout=300)
    assert info["status"] == "completed", info["error"]
    assert pool.b.disks(dies) == [f"{dies}-disk1.qcow2"] and domain_defined(dies)
    assert info["result"]["disks"][0]["path"] == str(
        pool.b.images / dies / f"{dies}-disk1.qcow2")
    # the export (shared folder, shared results) was not redone on host b
    assert "Cached" in _task_states(pool, job, "export"), _task_states(pool, job, "export")
    # host a's half-written disks are removed when its worker comes back; nothing finished
    assert {vm: sorted(p.name for p in (pool.a.images / vm).glob(".*.partial"))
            for vm in (dies, cancelled)} == left
    with pool.workers(pool.a):
        assert pool.a.disks(dies) == [] and pool.a.disks(cancelled) == []


def test_a_serving_daemon_leaves_the_pools_deployments_alone(pool: Pool) -> None:
    before = pool.rest("POST", "/deployments/filter", json={}).json()
    assert {d["work_pool_name"] for d in before} == {"hypersdk"}
    served = subprocess.run(
        [str(BIN / "hypervisord"), "--config", str(pool.a.config)],
        env=pool.server.env(), capture_output=True, text=True, timeout=120)
    assert served.returncode == 1
    assert "run on a work pool" in served.stderr and "--no-serve" in served.stderr
    after = pool.rest("POST", "/deployments/filter", json={}).json()
    assert sorted((d["id"], d["updated"], d["work_pool_name"], str(d["job_variables"]),
                   str(d["pull_steps"])) for d in after) == sorted(
        (d["id"], d["updated"], d["work_pool_name"], str(d["job_variables"]),
         str(d["pull_steps"])) for d in before)
