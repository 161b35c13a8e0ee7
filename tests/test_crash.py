"""An operator's bad day, as it happens: hypervisord killed with SIGKILL mid-job and
started again, a flow-run process killed mid-export, SIGTERM mid-job, two jobs for one VM.
Each daemon here has its own embedded Prefect server (as in production), so killing it
touches nothing else of the session."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from typing import Any

import httpx
import pytest

from api.recovery import flow_processes
from core.process import alive
from hyper2kvm import qemu_img
from tests.helpers import make_random_raw, qemu_img_running_on
from tests.peers import Daemon, Daemons, configure, unique, wait_for_job, wait_until

MIB = 2**20


def progress(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/progress/{job_id}").json()


def wait_for_phase(client: httpx.Client, job_id: str, phase: str) -> dict:
    def reached() -> dict | None:
        answer = progress(client, job_id)
        assert answer["status"] not in ("completed", "failed"), answer
        return answer if answer["phase"] == phase else None

    return wait_until(reached, timeout=120, interval=0.05, what=f"phase {phase}")


def job_in_phase(daemon: Daemon, prefix: str, mib: int, phase: str, *,
                 converts: bool = True) -> tuple[str, str]:
    """A job for a new VM of `mib` MiB of random data, once it has reached `phase`;
    returns the VM's name and the job id. A job that converts exports in no time (the
    local disk is hard-linked); one that does not packages an OVA, which takes a while."""
    name = unique(prefix)
    make_random_raw(daemon.inbox, name, mib)
    with daemon.client() as client:
        job_id = client.post("/jobs/submit", json={
            "vm_identifier": name, "hyper2kvm_integration": {"enabled": converts},
        }).json()["job_id"]
        wait_for_phase(client, job_id, phase)
    return name, job_id


def stop(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=120) == 0


def prefect_port(daemon: Daemon) -> int:
    text = daemon.config.read_text()
    return int(text.split("prefect_ui_port: ")[1].split()[0])


def server_answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def export_slots(daemon: Daemon) -> int:
    """The export limit's taken slots, from the daemon's own Prefect server."""
    return int(prefect_api(daemon, "v2/concurrency_limits/hypersdk-exports")["active_slots"])


def prefect_api(daemon: Daemon, path: str, body: Any = None) -> Any:
    """GET (or POST `body` to) the daemon's own Prefect server, with its credential."""
    credential = (daemon.root / "db" / "prefect" / "auth_string").read_text().strip()
    user, _, password = credential.partition(":")
    answer = httpx.request("GET" if body is None else "POST",
                           f"http://127.0.0.1:{prefect_port(daemon)}/api/{path}", json=body,
                           auth=(user, password), timeout=10)
    answer.raise_for_status()
    return answer.json()


def step_states(daemon: Daemon, job_id: str, step: str) -> list[str]:
    """The states of the job's runs of `step` (a task), oldest first: a step reused on a
    retry or resume shows as Cached, one run again as Completed."""
    runs = prefect_api(daemon, "task_runs/filter", {
        "flow_runs": {"id": {"any_": [job_id]}}, "sort": "EXPECTED_START_TIME_ASC"})
    return [run["state"]["name"] for run in runs if run["task_key"].startswith(f"{step}-")
            or run["name"].startswith(f"{step}-")]


def state_history(daemon: Daemon, job_id: str) -> list[tuple[str, str]]:
    """The job's flow-run states in order: (type, message)."""
    states = prefect_api(daemon, f"flow_run_states/?flow_run_id={job_id}")
    return [(state["type"], state["message"] or "")
            for state in sorted(states, key=lambda state: state["timestamp"])]


@pytest.fixture
def own_daemon(daemons: Daemons) -> Daemon:
    return daemons.start()


def test_a_daemon_killed_with_sigkill_starts_again_and_its_job_resumes_without_redoing_steps(
        daemons: Daemons, own_daemon: Daemon) -> None:
    # compressing random data keeps qemu-img at work for seconds (a plain copy of these
    # 768 MiB is over in 0.3 s, before a poll could see it)
    configure(own_daemon, compression=True)
    name, job_id = job_in_phase(own_daemon, "big", 768, "convert")
    # the kill lands while converting: qemu-img is writing the partial output
    wait_until(lambda: qemu_img_running_on(own_daemon.images)
               and list((own_daemon.images / name).glob(".*.partial")), timeout=30,
               interval=0.05, what="qemu-img writing the partial output")
    port = prefect_port(own_daemon)
    flow_pids = flow_processes(own_daemon.process.pid)
    assert flow_pids, "the job's flow-run process is the daemon's child"
    own_daemon.process.kill()  # SIGKILL: no clean-up of its own
    own_daemon.process.wait()
    # nothing it started outlives it: the Prefect server, the flow run, its qemu-img
    wait_until(lambda: not server_answers(port), timeout=30, what="the server to die")
    wait_until(lambda: not any(alive(pid) for pid in flow_pids), timeout=30,
               what="the flow-run process to die")
    wait_until(lambda: not qemu_img_running_on(own_daemon.images), timeout=30,
               what="qemu-img to die")

    again = daemons.restart(own_daemon)  # starts: no "port is taken"
    with again.client() as client:
        info = wait_for_job(client, job_id, timeout=300)
        assert info["status"] == "completed", info["error"]
    # the export finished before the kill: reused, not redone
    assert step_states(again, job_id, "export") == ["Completed", "Cached"]
    folder = again.images / name
    assert not list(folder.glob(".*.partial"))
    assert [p.name for p in folder.iterdir()] == [f"{name}-disk1.qcow2"]
    # the resumed conversion made the whole disk, not a copy of the half the kill left
    assert qemu_img.compare(own_daemon.inbox / f"{name}.raw", folder / f"{name}-disk1.qcow2")
    assert export_slots(again) == 0
    stop(again)


def test_a_daemon_killed_mid_export_leaks_no_export_slot(daemons: Daemons,
                                                         own_daemon: Daemon) -> None:
    _name, job_id = job_in_phase(own_daemon, "slot", 512, "export", converts=False)
    assert export_slots(own_daemon) == 1
    own_daemon.process.kill()
    own_daemon.process.wait()
    again = daemons.restart(own_daemon)
    with again.client() as client:
        info = wait_for_job(client, job_id, timeout=300)
        assert info["status"] == "completed", info["error"]
    # without reconciliation the slot the dead run held would stay taken for good
    assert export_slots(again) == 0
    stop(again)


def test_a_flow_run_killed_mid_export_frees_its_slot_at_once(own_daemon: Daemon) -> None:
    name, job_id = job_in_phase(own_daemon, "killed", 512, "export", converts=False)
    with own_daemon.client() as client:
        assert export_slots(own_daemon) == 1
        for pid in flow_processes(own_daemon.process.pid):
            os.kill(pid, signal.SIGKILL)
        info = wait_for_job(client, job_id, timeout=60)
        assert info["status"] == "failed"
        # released by the run's crash hook, not 300 s later when its lease would expire
        wait_until(lambda: export_slots(own_daemon) == 0, timeout=30, what="the slot")
        assert not list((own_daemon.exports / name).glob(".*.partial"))
        small = unique("next")
        make_random_raw(own_daemon.inbox, small, 8)
        next_job = client.post("/jobs/submit", json={"vm_identifier": small}).json()["job_id"]
        assert wait_for_job(client, next_job)["status"] == "completed"


def test_sigterm_lets_a_short_job_finish_and_stops_a_long_one_to_resume_later(
        daemons: Daemons) -> None:
    daemon = daemons.start(extra_daemon="  shutdown_grace: 3s\n")
    # packaging an OVA of 768 MiB of random data takes far longer than the grace
    _name, job_id = job_in_phase(daemon, "long", 768, "export", converts=False)
    with daemon.client() as client:
        assert progress(client, job_id)["status"] == "running"  # at the signal
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=90) == 0  # the grace, then a clean exit
    daemon.config.write_text(daemon.config.read_text().replace(
        "shutdown_grace: 3s", "shutdown_grace: 120s"))
    again = daemons.restart(daemon)
    with again.client() as client:
        info = wait_for_job(client, job_id, timeout=300)
        assert info["status"] == "completed", info["error"]  # not cancelled: resumed
        # it was stopped by the drain and put back in line, then ran again to the end
        history = state_history(again, job_id)
        resumed = next(i for i, (_kind, message) in enumerate(history)
                       if message.startswith("resumed: hypervisord stopped while it ran"))
        kinds = [kind for kind, _message in history]
        assert "RUNNING" in kinds[:resumed] and "RUNNING" in kinds[resumed:], history
        short = unique("short")
        make_random_raw(again.inbox, short, 8)
        short_job = client.post("/jobs/submit", json={"vm_identifier": short}).json()["job_id"]
        wait_until(lambda: progress(client, short_job)["status"] == "running", timeout=60,
                   interval=0.1, what="the short job to start")
        again.process.send_signal(signal.SIGTERM)
        # within the grace the running job finishes before the daemon exits
        assert again.process.wait(timeout=120) == 0
    final = daemons.restart(again)
    with final.client() as client:
        assert client.get("/jobs/query", params={"job_id": short_job}).json()[
            "status"] == "completed"
    stop(final)


def test_one_job_per_vm_and_export_folder(own_daemon: Daemon) -> None:
    name = unique("twice")
    make_random_raw(own_daemon.inbox, name, 256)
    with own_daemon.client() as client:
        both = client.post("/jobs/submit", json=[{"vm_identifier": name, "export_path": ""},
                                                 {"vm_identifier": name, "export_path": "."}])
        assert both.status_code == 409 and "twice" in both.json()["message"]
        first = client.post("/jobs/submit", json={"vm_identifier": name}).json()["job_id"]
        second = client.post("/jobs/submit", json={"vm_identifier": name})
        assert second.status_code == 409, second.text
        assert first in second.json()["message"]
        other = unique("other")
        make_random_raw(own_daemon.inbox, other, 8)
        same_folder = client.post("/jobs/submit", json={"vm_identifier": other,
                                                        "export_path": name})
        assert same_folder.status_code == 409 and first in same_folder.json()["message"]
        assert wait_for_job(client, first)["status"] == "completed"
        # ten submissions of one VM at the same instant: exactly one is accepted
        racer = unique("race")
        make_random_raw(own_daemon.inbox, racer, 8)

        def submit(_: int) -> int:
            with own_daemon.client() as each:
                return each.post("/jobs/submit", json={"vm_identifier": racer}).status_code

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            codes = sorted(pool.map(submit, range(10)))
        assert codes == [200] + [409] * 9
