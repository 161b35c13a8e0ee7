"""Schedules and backup policies on a real Prefect server with its scheduler running (loop
of 2 s in the tests), and retention on real directories."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from websockets.sync.client import ClientConnection, connect

from core.models import Retention
from hyper2kvm.sample import make_sample_ova
from tasks.retention import MARKER, plan_pruning, read_backups, stamp, write_marker
from tests.peers import SESSION_DIR, Daemon, start_daemon, stop_daemon, unique, wait_until


def listen(daemon: Daemon) -> ClientConnection:
    client = connect(daemon.url.replace("http://", "ws://") + f"/websocket?token="
                     f"{daemon.api_key}", max_queue=None)
    assert json.loads(client.recv(timeout=30))["type"] == "snapshot"
    return client


def heard(client: ClientConnection, match: Callable[[dict], bool], timeout: float = 30) -> dict:
    """The first message (already received or still to come) that matches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(client.recv(timeout=max(0.1, deadline - time.monotonic())))
        if match(message):
            return message
    raise AssertionError("no such message")


def job(vm: str) -> dict:
    return {"vm_identifier": vm, "provider": "local", "export_method": "ova",
            "hyper2kvm_integration": {"enabled": False}}


def test_schedule_validation(api: httpx.Client, sample_vm: str) -> None:
    bad_cron = api.post("/schedules/create", json={
        "name": unique("s"), "cron": "61 * * * *", "job_definition": job(sample_vm)})
    assert bad_cron.status_code == 422 and "61 * * * *" in bad_cron.json()["message"]
    bad_zone = api.post("/schedules/create", json={
        "name": unique("s"), "cron": "0 2 * * *", "timezone": "Mars/Olympus",
        "job_definition": job(sample_vm)})
    assert bad_zone.status_code == 422 and "Mars/Olympus" in bad_zone.json()["message"]
    no_vm = api.post("/schedules/create", json={
        "name": unique("s"), "cron": "0 2 * * *", "job_definition": job("no-such-vm")})
    assert no_vm.status_code == 422 and "no-such-vm" in no_vm.json()["message"]
    assert api.get("/schedules/does-not-exist").status_code == 404


def test_a_schedule_runs_its_job_and_is_managed_like_prefect_does(
        api: httpx.Client, daemon: Daemon, sample_vm: str) -> None:
    name = unique("every-minute")
    updates = listen(daemon)
    created = api.post("/schedules/create", json={
        "name": name, "cron": "* * * * *", "timezone": "Europe/Paris",
        "job_definition": job(sample_vm)})
    assert created.status_code == 200, created.text
    info = created.json()
    assert info["active"] and info["timezone"] == "Europe/Paris"
    runs = [datetime.fromisoformat(t) for t in info["next_runs"]]
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    assert len(runs) == 5 and set(gaps) == {timedelta(minutes=1)}
    assert name in {s["name"] for s in api.get("/schedules").json()["schedules"]}
    # trigger now: a normal job
    triggered = api.post(f"/schedules/{name}/trigger").json()
    # the cron fires within a minute: a job made by the scheduler, run by the daemon
    def scheduled_run() -> dict | None:
        page = api.get("/jobs/query", params={"status": "completed", "limit": 50}).json()
        return next((j for j in page["jobs"] if j["vm_identifier"] == sample_vm
                     and j["job_id"] != triggered["job_id"]), None)

    ran = wait_until(scheduled_run, timeout=150, interval=2, what="the cron's run")
    assert ran["definition"]["vm_identifier"] == sample_vm
    # the websocket announced it as a schedule's run
    triggered_event = heard(updates, lambda m: m.get("event") == "schedule.triggered"
                            and m.get("job_id") == ran["job_id"])
    assert triggered_event["type"] == "schedule" and triggered_event["vm"] == sample_vm
    updates.close()
    assert api.get("/jobs/query", params={"job_id": triggered["job_id"]}).json()[
        "status"] in ("pending", "running", "completed")
    # pause, resume, update, delete
    paused = api.post(f"/schedules/{name}/pause").json()
    assert not paused["active"] and paused["next_runs"] == []
    resumed = api.post(f"/schedules/{name}/resume").json()
    assert resumed["active"] and resumed["next_runs"]
    updated = api.put(f"/schedules/{name}", json={"cron": "0 3 * * *"}).json()
    assert updated["cron"] == "0 3 * * *" and updated["timezone"] == "Europe/Paris"
    assert all(datetime.fromisoformat(t).hour in (2, 3) for t in updated["next_runs"])  # UTC
    assert api.delete(f"/schedules/{name}").status_code == 200
    assert api.get(f"/schedules/{name}").status_code == 404


async def _prefect_ui_schedule() -> str:
    """What the Prefect UI does: a schedule added to the deployment, no slug."""
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("migrate-vm/hypervisord")
        [made] = await client.create_deployment_schedules(
            deployment.id, [(CronSchedule(cron="30 4 * * 1"), False)])
        return str(made.id)


def test_schedules_live_in_prefect_and_survive_a_restart(
        api: httpx.Client, daemon: Daemon, sample_vm: str) -> None:
    import asyncio

    made_in_ui = asyncio.run(_prefect_ui_schedule())
    listed = {s["id"]: s for s in api.get("/schedules").json()["schedules"]}
    assert listed[made_in_ui]["cron"] == "30 4 * * 1" and not listed[made_in_ui]["active"]
    name = unique("kept")
    assert api.post("/schedules/create", json={
        "name": name, "cron": "0 2 * * *", "active": False,
        "job_definition": job(sample_vm)}).status_code == 200
    # a daemon starting (as after a restart) registers the deployments again
    restarted = start_daemon(SESSION_DIR / unique("again"), api_key=None)
    try:
        with restarted.client() as client:
            names = {s["name"] for s in client.get("/schedules").json()["schedules"]}
    finally:
        assert stop_daemon(restarted) == 0
    assert name in names and made_in_ui in names
    assert api.delete(f"/schedules/{name}").status_code == 200
    assert api.delete(f"/schedules/{made_in_ui}").status_code == 200


# ---- retention ----------------------------------------------------------------------------


def _backup(vm_folder: Path, days_ago: float, status: str | None, now: datetime) -> Path:
    folder = vm_folder / stamp(now - timedelta(days=days_ago))
    folder.mkdir(parents=True)
    (folder / "disk.ova").write_bytes(os.urandom(64))
    if status:
        write_marker(folder, status=status)
    return folder


def test_retention_keeps_counts_and_ages_and_never_touches_running_ones(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    done = [_backup(tmp_path, d, "completed", now) for d in (0.1, 1, 2, 3, 4, 5)]
    failed_old = _backup(tmp_path, 4.5, "failed", now)
    failed_new = _backup(tmp_path, 0.5, "failed", now)
    running_old = _backup(tmp_path, 6, "running", now)
    unmarked = _backup(tmp_path, 7, None, now)
    (tmp_path / "notes.txt").write_text("not a backup")
    doomed = plan_pruning(read_backups(tmp_path), Retention(count=3, age_days=3.5), now)
    assert sorted(b.path for b in doomed) == sorted([done[3], done[4], done[5], failed_old])
    # failed and running ones never count towards `count`, nor make a completed one go
    assert failed_new not in {b.path for b in doomed}
    assert running_old not in {b.path for b in doomed} and unmarked not in {
        b.path for b in doomed}
    # the newest completed backup stays however old it is
    old_only = tmp_path / "old"
    newest = _backup(old_only, 40, "completed", now)
    older = _backup(old_only, 50, "completed", now)
    assert [b.path for b in plan_pruning(read_backups(old_only), Retention(count=5, age_days=30),
                                         now)] == [older]
    assert newest.exists()


def test_a_backup_left_running_by_a_policy_run_that_ended_is_pruned_as_failed(
        tmp_path: Path, prefect_server: str) -> None:
    """A policy run killed mid-backup never writes "failed": once Prefect has that run in
    a final state (or has it not at all) its "running" backup counts as failed."""
    import uuid

    from prefect import get_client
    from prefect.states import Crashed, Running

    from flows.backup_policy import ended_runs

    with get_client(sync_client=True) as client:
        crashed = client.create_flow_run(_probe_flow, state=Running())
        client.set_flow_run_state(crashed.id, Crashed(message="killed"), force=True)
        live = client.create_flow_run(_probe_flow, state=Running())
    gone = str(uuid.uuid4())
    assert ended_runs({str(crashed.id), str(live.id), gone}) == {str(crashed.id), gone}
    now = datetime.now(UTC)
    marked = {}
    for name, run_id in (("crashed", crashed.id), ("live", live.id), ("gone", gone)):
        folder = tmp_path / stamp(now - timedelta(days=len(marked) + 5))
        folder.mkdir()
        write_marker(folder, status="running", policy_run=str(run_id))
        marked[name] = folder
    doomed = plan_pruning(read_backups(tmp_path), Retention(count=3, age_days=3),
                          now, ended_runs=ended_runs({str(crashed.id), str(live.id), gone}))
    assert sorted(b.path for b in doomed) == sorted([marked["crashed"], marked["gone"]])


@flow(name="hand-made-runs")
def _probe_flow() -> None:
    """A flow for runs created by hand."""


def test_a_completed_marker_is_written_only_after_the_backup_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention trusts "completed": the data it vouches for is fsynced first, then the
    marker, then its directory entry (what a power cut needs)."""
    from core.files import make_durable

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    backup = tmp_path / "vm" / "20261126T000000Z"
    (backup / "disks").mkdir(parents=True)
    (backup / "vm.ovf").write_text("<Envelope/>")
    (backup / "disks" / "disk1.vmdk").write_bytes(os.urandom(4096))
    make_durable(backup)
    write_marker(backup, status="completed")
    assert synced[:4] == [str(backup / "disks" / "disk1.vmdk"), str(backup / "disks"),
                          str(backup / "vm.ovf"), str(backup)]
    assert synced[4].endswith(f"{MARKER}.partial") and synced[5] == str(backup)
    assert read_backups(backup.parent)[0].status == "completed"


# ---- backup policies ----------------------------------------------------------------------


def test_backup_policy_backs_up_matching_vms_and_applies_retention(
        api: httpx.Client, daemon: Daemon) -> None:
    prefix = unique("t-bk")
    for suffix in ("a", "b"):
        make_sample_ova(daemon.inbox, f"{prefix}-{suffix}", size_mib=8)
    broken = daemon.inbox / f"{prefix}-c"  # an OVF folder whose descriptor is garbage
    broken.mkdir()
    (broken / "c.ovf").write_text("<not ovf")
    policy = unique("nightly")
    now = datetime.now(UTC)
    vm_a = daemon.exports / policy / f"{prefix}-a"
    old = [_backup(vm_a, d, "completed", now) for d in (1, 2, 3, 4, 5)]
    failed_old = _backup(vm_a, 4.5, "failed", now)
    running = _backup(vm_a, 6, "running", now)

    body = {"name": policy, "provider": "local", "schedule": "0 3 1 1 *",
            "vm_filter": {"name_pattern": f"{prefix}-*"},
            "retention": {"count": 3, "age_days": 3.5},
            "export_options": {"export_method": "ova"}}
    created = api.post("/backup-policies/create", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["next_runs"][0].startswith(f"{now.year + 1}-01-01T03:00")
    assert api.post("/backup-policies/create", json=body).status_code == 409
    assert api.post("/backup-policies/create", json={**body, "name": unique("x"),
                                                      "schedule": "nope"}).status_code == 422

    updates = listen(daemon)
    run = api.post(f"/backup-policies/{policy}/run").json()
    info = wait_until(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
        api.get("/jobs/query", params={"job_id": run["job_id"]}).json()),
        timeout=240, interval=1, what="the backup run")
    assert info["status"] == "failed"  # one VM of three failed
    assert "1 of 3" in info["error"]
    announced = heard(updates, lambda m: m.get("job_id") == run["job_id"]
                      and m.get("type") == "backup")
    assert announced["event"] == "backup.failed" and announced["policy"] == policy
    updates.close()
    report = info["result"]
    assert sorted(o["vm"] for o in report["backed_up"]) == [f"{prefix}-a", f"{prefix}-b"]
    assert [o["vm"] for o in report["failed"]] == [f"{prefix}-c"]
    assert report["failed"][0]["error"]
    assert sorted(report["pruned"]) == sorted(str(p) for p in (old[2], old[3], old[4],
                                                               failed_old))
    # on disk: a's newest backup plus the two youngest old ones, and the running one
    newest = next(Path(o["path"]) for o in report["backed_up"] if o["vm"].endswith("-a"))
    assert {p.name for p in vm_a.iterdir()} == {newest.name, old[0].name, old[1].name,
                                                running.name}
    for outcome in report["backed_up"]:
        folder = Path(outcome["path"])
        assert json.loads((folder / MARKER).read_text())["status"] == "completed"
        assert (folder / f"{outcome['vm']}.ova").is_file()
        sub = api.get("/jobs/query", params={"job_id": outcome["job_id"]}).json()
        assert sub["status"] == "completed" and sub["definition"]["export_path"].startswith(
            f"{policy}/")
    failed_folder = Path(report["failed"][0]["path"])
    assert json.loads((failed_folder / MARKER).read_text())["status"] == "failed"

    listed = api.get("/backup-policies").json()["policies"]
    assert policy in {p["name"] for p in listed}
    assert api.delete(f"/backup-policies/{policy}").json()["backups_deleted"] is False
    assert vm_a.is_dir()  # deleting a policy keeps its backups
    assert api.get(f"/backup-policies/{policy}").status_code == 404
    # ... unless asked
    assert api.post("/backup-policies/create", json=body).status_code == 200
    gone = api.delete(f"/backup-policies/{policy}", params={"delete_backups": "true"})
    assert gone.json()["backups_deleted"] is True and not (daemon.exports / policy).exists()


def test_more_backup_runs_at_once_than_workers_do_not_starve_their_vms(
        api: httpx.Client, daemon: Daemon) -> None:
    """A backup run only waits for its VMs' runs: four at once on a daemon with four
    workers must not take every slot and leave those runs waiting forever."""
    prefix = unique("t-busy")
    policies = [unique("busy") for _ in range(4)]
    runs = []
    for index, policy in enumerate(policies):
        make_sample_ova(daemon.inbox, f"{prefix}-{index}", size_mib=8)
        body = {"name": policy, "provider": "local", "schedule": "0 3 1 1 *",
                "vm_filter": {"name_pattern": f"{prefix}-{index}"},
                "export_options": {"export_method": "ova"}}
        assert api.post("/backup-policies/create", json=body).status_code == 200
    for policy in policies:
        runs.append(api.post(f"/backup-policies/{policy}/run").json()["job_id"])

    def all_finished() -> list[dict] | None:
        infos = [api.get("/jobs/query", params={"job_id": run}).json() for run in runs]
        return infos if all(i["status"] in ("completed", "failed") for i in infos) else None

    infos = wait_until(all_finished, timeout=180, interval=1, what="four backup runs")
    assert [i["status"] for i in infos] == ["completed"] * 4, [i.get("error") for i in infos]
    for policy in policies:
        api.delete(f"/backup-policies/{policy}", params={"delete_backups": "true"})


def test_config_webhooks_are_subscriptions_with_hidden_secrets(tmp_path: Path) -> None:
    from api.webhooks import WebhookStore
    from core.config import Config

    settings = Config.model_validate({"webhooks": [{
        "url": "https://hooks.example.com/x", "events": ["job.failed"],
        "headers": {"Authorization": "Bearer s3cret"}, "secret": "0123456789abcdef0123"}]})
    store = WebhookStore(tmp_path / "db.sqlite")
    store.sync_config(settings)
    store.sync_config(settings)  # at every start: replaced, not duplicated
    [hook] = store.subscriptions()
    assert hook["source"] == "config" and hook["headers"] == {"Authorization": "***"}
    assert "s3cret" not in json.dumps(hook) and "secret" not in hook
    assert store.enqueue({"event": "job.failed", "event_id": "e1", "job_id": "j"}) == 1
    assert store.enqueue({"event": "job.failed", "event_id": "e1", "job_id": "j"}) == 0
    assert store.enqueue({"event": "job.started", "event_id": "e2", "job_id": "j"}) == 0
    store.close()
