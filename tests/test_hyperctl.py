"""`hyperctl`, the installed console script, against the session's daemon: a followed
migration to a defined domain, JSON that parses, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx

from hyper2kvm import qemu_img
from hyper2kvm.sample import make_sample_ova
from tests.helpers import domain_defined, make_truncated_ova
from tests.peers import BIN, Daemon, free_port, unique, wait_until


def hyperctl(daemon: Daemon, *args: str, key: str | None = "default",
             env: dict[str, str] | None = None, timeout: float = 300
             ) -> subprocess.CompletedProcess[str]:
    """hyperctl with the daemon's URL and key in its environment, as a script sets them."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HYPERSDK_")}
    environ.update(HYPERSDK_URL=daemon.url, HYPERSDK_CTL_CONFIG="/nonexistent", COLUMNS="200")
    chosen = daemon.api_key if key == "default" else key
    if chosen:
        environ["HYPERSDK_API_KEY"] = chosen
    environ.update(env or {})
    return subprocess.run([str(BIN / "hyperctl"), *args], env=environ, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_migrate_follow_ends_with_the_domain(daemon: Daemon) -> None:
    vm = unique("ctl")
    make_sample_ova(daemon.inbox, vm, size_mib=32, random_mib=8)
    done = hyperctl(daemon, "migrate", vm, "--provider", "local", "--format", "raw",
                    "--follow")
    assert done.returncode == 0, done.stderr
    assert f"completed: domain {vm}" in done.stdout
    assert domain_defined(vm)
    assert (daemon.images / vm / f"{vm}-disk1.raw").is_file()  # --format reached the job
    # the JSON views parse and agree with the API
    listed = hyperctl(daemon, "--json", "jobs", "list", "--status", "completed")
    assert listed.returncode == 0
    job = next(j for j in json.loads(listed.stdout)["jobs"] if j["vm_identifier"] == vm)
    shown = json.loads(hyperctl(daemon, "--json", "jobs", "show", job["job_id"]).stdout)
    assert shown["status"] == "completed" and shown["result"]["domain_name"] == vm
    logs = hyperctl(daemon, "jobs", "logs", job["job_id"])
    assert logs.returncode == 0 and "migration of" in logs.stdout
    vms = json.loads(hyperctl(daemon, "--json", "vms", "list", "--name-pattern", vm).stdout)
    assert [v["identifier"] for v in vms["vms"]] == [vm]
    table = hyperctl(daemon, "jobs", "list")
    assert table.returncode == 0 and job["job_id"] in table.stdout


def test_migrate_dry_run_shows_the_plan_and_exits_1_on_a_blocker(daemon: Daemon) -> None:
    vm = unique("ctl-dry")
    make_sample_ova(daemon.inbox, vm, size_mib=32)
    clear = hyperctl(daemon, "migrate", vm, "--dry-run")
    assert clear.returncode == 0, clear.stderr
    assert "nothing in the way" in clear.stdout and "0.03 GiB" in clear.stdout, clear.stdout
    left = daemon.images / vm / f"{vm}-disk1.qcow2"  # an earlier run's output
    left.parent.mkdir()
    left.write_bytes(b"")
    try:
        blocked = hyperctl(daemon, "migrate", vm, "--dry-run")
    finally:
        left.unlink()
        left.parent.rmdir()
    assert blocked.returncode == 1, blocked.stdout
    assert "blocker output_exists" in blocked.stdout, blocked.stdout
    assert not domain_defined(vm) and not (daemon.exports / vm).exists()


def test_a_failed_job_exits_1_with_its_reason(daemon: Daemon) -> None:
    vm = unique("ctl-bad")
    make_truncated_ova(daemon.inbox, vm)
    done = hyperctl(daemon, "migrate", vm, "--follow", "--json")
    assert done.returncode == 1, done.stderr
    info = json.loads(done.stdout)
    assert info["status"] == "failed" and info["error"]


def test_a_cancelled_job_exits_3(daemon: Daemon) -> None:
    vm = unique("ctl-cancel")
    make_sample_ova(daemon.inbox, vm, size_mib=600, random_mib=512)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HYPERSDK_")}
    environ.update(HYPERSDK_URL=daemon.url, HYPERSDK_API_KEY=daemon.api_key or "",
                   HYPERSDK_CTL_CONFIG="/nonexistent")
    following = subprocess.Popen([str(BIN / "hyperctl"), "migrate", vm, "--follow"],
                                 env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    assert following.stderr is not None
    first = following.stderr.readline()
    assert first.startswith("job "), first
    job_id = first.split()[1]
    with daemon.client() as api:
        wait_until(lambda: api.get(f"/jobs/progress/{job_id}").json()["status"] == "running",
                   timeout=60, what="the job running")
    cancel = hyperctl(daemon, "jobs", "cancel", job_id)
    assert cancel.returncode == 0 and "cancelling" in cancel.stdout
    assert following.wait(timeout=120) == 3
    assert "cancelled" in following.stderr.read()


def test_exit_codes_for_a_daemon_that_is_away_or_refuses(daemon: Daemon, tmp_path: Path) -> None:
    away = hyperctl(daemon, "jobs", "list",
                    env={"HYPERSDK_URL": f"http://127.0.0.1:{free_port()}"})
    assert away.returncode == 4 and "cannot reach hypervisord" in away.stderr
    assert_one_line_error(away)
    refused = hyperctl(daemon, "jobs", "list", key="not-the-key")
    assert refused.returncode == 4 and "invalid API key" in refused.stderr
    assert_one_line_error(refused)
    unknown = hyperctl(daemon, "jobs", "show", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 2 and "no job" in unknown.stderr  # the API's own message
    assert_one_line_error(unknown)
    assert hyperctl(daemon, "jobs", "show").returncode == 2  # a missing argument
    assert hyperctl(daemon, "migrate", "x", "--provider", "nowhere").returncode == 2
    # flags win over the environment; a config file serves when neither is given
    config = tmp_path / "hyperctl.yaml"
    config.write_text(f"url: {daemon.url}\napi_key: {daemon.api_key}\n")
    from_file = hyperctl(daemon, "--config", str(config), "--json", "jobs", "list", key=None,
                         env={"HYPERSDK_URL": ""})
    assert from_file.returncode == 0 and "jobs" in json.loads(from_file.stdout)
    flagged = hyperctl(daemon, "--url", f"http://127.0.0.1:{free_port()}", "jobs", "list")
    assert flagged.returncode == 4


def test_schedules_and_webhooks_round_trip(daemon: Daemon) -> None:
    name, vm = unique("ctl-schedule"), unique("ctl-scheduled")
    make_sample_ova(daemon.inbox, vm, size_mib=8)
    created = hyperctl(daemon, "--json", "schedules", "create", name, "--cron", "0 3 * * *",
                       "--vm", vm)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["cron"] == "0 3 * * *"
    paused = json.loads(hyperctl(daemon, "--json", "schedules", "pause", name).stdout)
    assert paused["active"] is False
    listed = hyperctl(daemon, "schedules", "list")
    assert name in listed.stdout
    assert hyperctl(daemon, "schedules", "delete", name).returncode == 0
    assert hyperctl(daemon, "schedules", "pause", name).returncode == 2  # gone
    hook = hyperctl(daemon, "--json", "webhooks", "add", f"http://127.0.0.1:{free_port()}/x",
                    "--event", "job.failed", "--header", "X-Team=ops")
    assert hook.returncode == 0, hook.stderr
    hook_id = json.loads(hook.stdout)["id"]
    with httpx.Client(base_url=daemon.url,
                      headers={"Authorization": f"Bearer {daemon.api_key}"}) as api:
        stored = next(w for w in api.get("/webhooks").json()["webhooks"] if w["id"] == hook_id)
    assert stored["events"] == ["job.failed"] and "X-Team" in stored["headers"]
    assert hyperctl(daemon, "webhooks", "remove", hook_id).returncode == 0
    bad = hyperctl(daemon, "webhooks", "add", "http://x", "--header", "novalue")
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_shell_completion_completes_commands(daemon: Daemon) -> None:
    done = hyperctl(daemon, env={"_HYPERCTL_COMPLETE": "complete_bash",
                                 "COMP_WORDS": "hyperctl backup", "COMP_CWORD": "1"})
    assert done.returncode == 0 and done.stdout.split() == ["backup-policies"]


def test_a_warm_migration_waits_for_its_cutover_from_hyperctl(daemon: Daemon) -> None:
    vm = unique("ctl-warm")
    qemu_img.create(daemon.inbox / f"{vm}.qcow2", "qcow2", 16 << 20)
    done = hyperctl(daemon, "--json", "migrate", vm, "--warm", "--precopy-interval", "3600")
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    early = hyperctl(daemon, "jobs", "cutover", job_id, "--at", "2999-01-01T00:00:00Z")
    assert early.returncode == 0 and "cutover at 2999-01-01" in early.stdout, early.stderr

    def waiting() -> bool:
        shown = json.loads(hyperctl(daemon, "--json", "jobs", "show", job_id).stdout)
        assert shown["status"] not in ("completed", "failed", "cancelled"), shown
        return bool(shown["status"] == "waiting")

    wait_until(waiting, timeout=120, what="the job waiting for its cutover")
    listed = json.loads(hyperctl(daemon, "--json", "jobs", "list", "--status", "waiting").stdout)
    assert job_id in [j["job_id"] for j in listed["jobs"]]
    now = hyperctl(daemon, "jobs", "cutover", job_id)
    assert now.returncode == 0 and "cutting over now" in now.stdout, now.stderr
    followed = hyperctl(daemon, "jobs", "retry", job_id)  # not failed: refused, one line
    assert followed.returncode != 0
    assert_one_line_error(followed)
    wait_until(lambda: json.loads(hyperctl(daemon, "--json", "jobs", "show", job_id).stdout)[
        "status"] == "completed", timeout=120, what="the cutover")
    assert domain_defined(vm)
