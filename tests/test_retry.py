"""A job retried (or resumed) after a failure in any step completes, with disks the same
as a fresh migration's: each step's persisted result is reused only while what it made is
still there and the same (tasks.reuse). The VMs are a data disk (guest conversion in
`auto` finds no OS and keeps the bytes, so the disk is compared with its source byte for
byte) and hand-assembled boot sectors that print a login prompt (so the boot check can
pass). Each test has a daemon with its own embedded Prefect server and a config it edits
between the attempts, as an operator fixing the cause would."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest

from api.recovery import flow_processes
from core.process import alive
from hyper2kvm import qemu_img
from hyper2kvm.registration import undefine_domain
from tests.helpers import boot_sector_disk, domain_defined, make_random_raw
from tests.peers import (
    LIBVIRT_URI,
    Daemon,
    Daemons,
    configure,
    job_logs,
    unique,
    wait_for_job,
    wait_until,
)
from tests.test_crash import progress, step_states, stop

pytestmark = pytest.mark.timeout(1200)  # a retry's 600 s after a first attempt's 300 s


def submit(client: httpx.Client, name: str) -> str:
    answer = client.post("/jobs/submit", json={"vm_identifier": name})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["job_id"])


def retry(client: httpx.Client, job_id: str) -> dict:
    answer = client.post("/jobs/retry", json={"job_id": job_id})
    assert answer.status_code == 200, answer.text
    return wait_for_job(client, job_id, timeout=600)


def in_step(client: httpx.Client, job_id: str, phase: str, *, also: Any = None) -> None:
    def reached() -> bool:
        answer = progress(client, job_id)
        assert answer["status"] not in ("completed", "failed", "cancelled"), answer
        return answer["phase"] == phase and (also is None or also())

    wait_until(reached, timeout=300, interval=0.1, what=f"step {phase}")


def cancel(client: httpx.Client, job_id: str) -> None:
    assert client.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
    assert wait_for_job(client, job_id, timeout=120)["status"] == "cancelled"
    wait_until(lambda: client.get("/jobs/query", params={"job_id": job_id}).json()["state"]
               == "Cancelled", timeout=60, what="Cancelling to end in Cancelled")


def rerun_steps(client: httpx.Client, job_id: str) -> list[str]:
    """The steps whose earlier result a retry found no longer holding (tasks.reuse)."""
    wait_until(lambda: any(line.startswith("migration of") for line in
                           job_logs(client, job_id)), timeout=60,
               what="the completed run's last log line")
    return [line.split()[1].rstrip(":") for line in job_logs(client, job_id)
            if "its earlier result no longer holds" in line]


def same_disk(info: dict, source: Path) -> None:
    disks = info["result"]["disks"]
    assert len(disks) == 1
    assert qemu_img.compare(source, Path(disks[0]["path"])), "the disk is not its source's"
    folder = Path(disks[0]["path"]).parent
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


def holding(folder: Path) -> list[str]:
    """Processes whose command line names a file in `folder` (qemu-nbd serving a disk)."""
    found = subprocess.run(["pgrep", "-a", "-f", str(folder)], capture_output=True,
                           text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def v2v_running() -> bool:
    return subprocess.run(["pgrep", "-f", "virt-v2v-in-place"], capture_output=True
                          ).returncode == 0


def prompt_vm(daemon: Daemon, *, after_enter: bool) -> tuple[str, Path]:
    """A VM whose console shows a login prompt (after Enter is typed, if asked)."""
    name = unique("prompt")
    disk = boot_sector_disk(daemon.inbox / f"{name}.raw", f"\r\n{name} login: ".encode(),
                            wait_for_key=after_enter)
    return name, disk


def test_retry_after_a_failed_guest_step_converts_the_disks_again(editable_daemon: Daemon) -> None:
    daemon = editable_daemon
    configure(daemon, convert_guest="auto", guest_timeout="1s")
    name = unique("guestfail")
    source = make_random_raw(daemon.inbox, name, 64)
    with daemon.client() as client:
        job_id = submit(client, name)
        failed = wait_for_job(client, job_id, timeout=300)
        assert failed["status"] == "failed", failed
        assert "did not finish within 1 s" in failed["error"], failed["error"]
        assert not list((daemon.images / name).glob("*disk*"))  # the guest step removed them
        configure(daemon, guest_timeout="10m")
        info = retry(client, job_id)
        assert info["status"] == "completed", info["error"]
        assert rerun_steps(client, job_id) == ["convert"]
        logs = job_logs(client, job_id)
    assert len([line for line in logs if line.startswith(f"exporting {name}")]) == 1
    guest = info["result"]["guest"]
    assert guest["converted"] is False, guest
    same_disk(info, source)


def test_retry_after_a_required_boot_check_failed_defines_the_domain_again(
        editable_daemon: Daemon) -> None:
    daemon = editable_daemon
    # the prompt comes only after Enter, which the check types after 15 s of silence
    configure(daemon, verify_boot="require", boot_timeout="5s")
    name, source = prompt_vm(daemon, after_enter=True)
    with daemon.client() as client:
        job_id = submit(client, name)
        failed = wait_for_job(client, job_id, timeout=300)
        assert failed["status"] == "failed", failed
        assert "boot check failed" in failed["error"] and "not up within 5 s" in failed["error"]
        assert not domain_defined(name)  # `require` undefined it
        configure(daemon, boot_timeout="5m")
        info = retry(client, job_id)
        assert info["status"] == "completed", info["error"]
        # the config changed, so register and the boot check run anew; convert is reused
        assert rerun_steps(client, job_id) == []
        assert sum(line.startswith("converted ") for line in job_logs(client, job_id)) == 1
    assert info["result"]["boot"]["verified"] is True, info["result"]["boot"]
    assert f"{name} login:" in info["result"]["boot"]["reason"]
    assert domain_defined(name)
    same_disk(info, source)


def test_retry_after_a_failed_register_completes(editable_daemon: Daemon) -> None:
    daemon = editable_daemon
    name = unique("regfail")
    source = make_random_raw(daemon.inbox, name, 768)
    conn = libvirt.open(LIBVIRT_URI)
    try:
        with daemon.client() as client:
            job_id = submit(client, name)
            in_step(client, job_id, "convert")
            # a domain of the VM's name appears after validate checked there was none
            conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory>65536</memory>"
                           "<os><type arch='x86_64'>hvm</type></os></domain>")
            failed = wait_for_job(client, job_id, timeout=300)
            assert failed["status"] == "failed", failed
            assert "already exists" in failed["error"], failed["error"]
            conn.lookupByName(name).undefine()  # the operator removes the stray domain
            info = retry(client, job_id)
            assert info["status"] == "completed", info["error"]
            assert rerun_steps(client, job_id) == []  # convert's disks are still the same
    finally:
        conn.close()
    assert domain_defined(name)
    same_disk(info, source)


@pytest.mark.parametrize("step", ["convert", "guest", "boot"])
def test_a_job_cancelled_in_any_step_completes_when_retried(editable_daemon: Daemon,
                                                            step: str) -> None:
    daemon = editable_daemon
    configure(daemon, convert_guest="auto" if step == "guest" else False,
              verify_boot="warn" if step == "boot" else "off", boot_timeout="5m")
    if step == "boot":
        name, source = prompt_vm(daemon, after_enter=True)  # 15 s in the boot check
    else:
        name = unique(f"cancel-{step}")
        source = make_random_raw(daemon.inbox, name, 768 if step == "convert" else 64)
    with daemon.client() as client:
        job_id = submit(client, name)
        in_step(client, job_id, step, also=v2v_running if step == "guest" else None)
        cancel(client, job_id)
        left = sorted(p.name for p in (daemon.images / name).glob("*disk*"))
        # nothing half-made is left; the boot check reads finished disks and leaves them
        assert left == ([f"{name}-disk1.qcow2"] if step == "boot" else []), left
        if step == "boot":  # and someone removes the domain before the retry
            assert domain_defined(name)
            undefine_domain(LIBVIRT_URI, name)
        info = retry(client, job_id)
        assert info["status"] == "completed", info["error"]
        expected = {"convert": [], "guest": ["convert"], "boot": ["register"]}[step]
        assert rerun_steps(client, job_id) == expected
        logs = job_logs(client, job_id)
    assert len([line for line in logs if line.startswith(f"exporting {name}")]) == 1
    if step == "boot":
        assert info["result"]["boot"]["verified"] is True, info["result"]["boot"]
        assert domain_defined(name)
    same_disk(info, source)


def test_a_daemon_killed_during_guest_conversion_resumes_and_completes(
        daemons: Daemons) -> None:
    daemon = daemons.start()
    configure(daemon, convert_guest="auto")
    name = unique("guestkill")
    source = make_random_raw(daemon.inbox, name, 64)
    with daemon.client() as client:
        job_id = submit(client, name)
        in_step(client, job_id, "guest", also=v2v_running)
        assert list((daemon.images / name).glob(".*.partial"))  # the disk, while converted
    flow_pids = flow_processes(daemon.process.pid)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    # the flow run, virt-v2v and every helper it started (its qemu-nbd on the disk) die
    wait_until(lambda: not any(alive(pid) for pid in flow_pids) and not v2v_running()
               and not holding(daemon.images / name), timeout=60,
               what="the flow run, virt-v2v and its helpers to die with the daemon")
    again = daemons.restart(daemon)
    with again.client() as client:
        info = wait_for_job(client, job_id, timeout=600)
        assert info["status"] == "completed", info["error"]
        # the partial disk the kill left is gone, so convert ran again; the export did not
        assert rerun_steps(client, job_id) == ["convert"]
    assert step_states(again, job_id, "export") == ["Completed", "Cached"]
    assert info["result"]["guest"]["converted"] is False
    same_disk(info, source)
    stop(again)
