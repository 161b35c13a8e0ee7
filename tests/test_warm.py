"""Warm migration of a local disk image that keeps changing: the precopy, sync rounds that
write only what changed, a cutover through the REST API or through Prefect's resume (what
the Prefect UI's form sends), and a result equal, byte for byte, to the source as it was
at the cutover. The "running VM" is qemu-io writing into the qcow2 between rounds."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client

from hyper2kvm import qemu_img
from tests.helpers import MIB
from tests.peers import Daemon, job_logs, unique, wait_for_job, wait_until


def write(disk: Path, *commands: str) -> None:
    """What a running guest would do to its disk (qemu-io: `write -P 0xNN OFFSET LEN`)."""
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(disk)], check=True, capture_output=True)


def running_vm(daemon: Daemon) -> tuple[str, Path]:
    name = unique("warm")
    disk = daemon.inbox / f"{name}.qcow2"
    qemu_img.create(disk, "qcow2", 64 * MIB)
    write(disk, "write -P 0x11 0 3M", "write -P 0x22 20M 5M", "write -P 0x33 63M 1M")
    return name, disk


def submit_warm(api: httpx.Client, name: str, **options: object) -> str:
    answer = api.post("/jobs/submit", json={
        "vm_identifier": name, "options": {"warm": True, **options},
        "hyper2kvm_integration": {"convert_guest": False, "verify_boot": "off"}})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["job_id"])


def progress(api: httpx.Client, job_id: str) -> dict:
    answer = api.get(f"/jobs/progress/{job_id}").json()
    assert answer["status"] not in ("completed", "failed", "cancelled"), answer
    return answer


def waiting_after_round(api: httpx.Client, job_id: str, number: int) -> dict:
    """The job paused for its cutover, its rounds up to `number` done."""
    return wait_until(lambda: (lambda p: p if p["status"] == "waiting"
                               and (p["round"] or 0) >= number else None)(
        progress(api, job_id)), timeout=180, interval=0.2, what=f"round {number} done")


def copy_of(info: dict) -> Path:
    disks = info["result"]["disks"]
    assert len(disks) == 1
    return Path(disks[0]["path"])


def test_a_warm_job_syncs_what_changed_and_cuts_over_to_the_last_state(
        api: httpx.Client, daemon: Daemon) -> None:
    name, disk = running_vm(daemon)
    job_id = submit_warm(api, name, precopy_interval=5)
    first = waiting_after_round(api, job_id, 0)
    assert first["phase"] == "precopy" and first["changed_bytes"] == 9 * MIB, first
    assert api.get("/jobs/query", params={"job_id": job_id}).json()["status"] == "waiting"

    write(disk, "write -P 0x44 1M 2M", "write -z 21M 1M")  # the guest works on
    written = progress(api, job_id)["round"] or 0
    waiting_after_round(api, job_id, written + 2)  # a whole round began after the writes

    write(disk, "write -P 0x55 40M 1M")
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    answer = api.post("/jobs/cutover", json={"job_id": job_id, "at": past})
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"] == "cutting over now"

    info = wait_for_job(api, job_id, timeout=180)
    assert info["status"] == "completed", info["error"]
    assert qemu_img.compare(disk, copy_of(info)), "the copy is not the disk at cutover"
    warm = info["result"]["warm"]
    rounds = warm["rounds"]
    assert rounds[0] == {**rounds[0], "round": 0, "changed_bytes": 9 * MIB, "final": False}
    assert [r["final"] for r in rounds] == [False] * (len(rounds) - 1) + [True]
    # after the precopy only what the guest changed was written: 3 MiB (2 written, 1
    # zeroed) by the sync rounds, 1 MiB more by them or by the final round
    assert sum(r["changed_bytes"] for r in rounds[1:-1]) >= 3 * MIB
    assert sum(r["changed_bytes"] for r in rounds[1:]) == 4 * MIB
    assert 0 < warm["downtime_seconds"] < sum(info["result"]["step_seconds"].values())
    assert info["result"]["domain_name"] and not list(
        copy_of(info).parent.glob(".*.partial"))
    wait_until(lambda: any("s of downtime" in line for line in job_logs(api, job_id)),
               timeout=30, what="the downtime in the job's logs")
    assert sum("round" in line and "written in" in line for line in job_logs(api, job_id)) \
        == len(rounds) - 1  # a line per sync round (and one for the precopy)

    again = api.post("/jobs/cutover", json={"job_id": job_id})
    assert again.status_code == 409 and "has ended" in again.json()["message"]


def test_prefects_resume_form_cuts_over_and_the_last_round_copies_the_last_writes(
        api: httpx.Client, daemon: Daemon) -> None:
    """No timed round can run (an hour's interval): what the guest wrote while the job
    waited reaches the copy in the final round, resumed as the Prefect UI does."""
    name, disk = running_vm(daemon)
    job_id = submit_warm(api, name, precopy_interval=3600)
    waiting_after_round(api, job_id, 0)
    write(disk, "write -P 0x66 10M 2M")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(job_id))
        assert run.state is not None and run.state.is_paused()
        keyset = run.state.state_details.run_input_keyset
        assert keyset is not None  # the form's schema is saved for the UI
        client.resume_flow_run(UUID(job_id), run_input={})
    info = wait_for_job(api, job_id, timeout=180)
    assert info["status"] == "completed", info["error"]
    rounds = info["result"]["warm"]["rounds"]
    assert [(r["round"], r["final"], r["changed_bytes"]) for r in rounds] == [
        (0, False, 9 * MIB), (1, True, 2 * MIB)]
    assert qemu_img.compare(disk, copy_of(info))


def test_cutover_at_submit_and_what_a_warm_job_refuses(
        api: httpx.Client, daemon: Daemon, sample_vm: str) -> None:
    name, disk = running_vm(daemon)
    soon = (datetime.now(UTC) + timedelta(seconds=8)).isoformat()
    job_id = submit_warm(api, name, precopy_interval=3600, cutover_at=soon)
    info = wait_for_job(api, job_id, timeout=180)
    assert info["status"] == "completed", info["error"]
    warm = info["result"]["warm"]
    assert datetime.fromisoformat(warm["cutover_at"]) >= datetime.fromisoformat(soon)
    assert qemu_img.compare(disk, copy_of(info))

    for provider in ("aws", "azure"):
        refused = api.post("/jobs/submit", json={"vm_identifier": "i-any", "provider": provider,
                                                 "options": {"warm": True}})
        assert refused.status_code == 422, refused.text
        assert f"not available for provider {provider}" in refused.json()["message"]
    ova = api.post("/jobs/submit", json={"vm_identifier": sample_vm, "options": {"warm": True}})
    assert ova.status_code == 422 and "OVA or OVF" in ova.json()["message"], ova.text
    kept = api.post("/jobs/submit", json={"vm_identifier": name, "options": {
        "warm": True, "keep_export": True}})
    assert kept.status_code == 422 and "keep_export" in kept.json()["message"], kept.text
    cold = api.post("/jobs/submit", json={"vm_identifier": sample_vm})
    assert cold.status_code == 200
    cold_id = cold.json()["job_id"]
    refused = api.post("/jobs/cutover", json={"job_id": cold_id})
    assert refused.status_code == 409 and "not a warm migration" in refused.json()["message"]
    assert wait_for_job(api, cold_id, timeout=300)["status"] == "completed"
    unknown = api.post("/jobs/cutover", json={"job_id": "not-a-job"})
    assert unknown.status_code == 404


def test_cancel_while_waiting_for_cutover_removes_the_copy(
        api: httpx.Client, daemon: Daemon) -> None:
    name, _ = running_vm(daemon)
    job_id = submit_warm(api, name, precopy_interval=3600)
    waiting_after_round(api, job_id, 0)
    folder = daemon.images / name
    assert [p.name for p in folder.iterdir()] == [f".{name}-disk1.qcow2.partial"]
    answer = api.post("/jobs/cancel", json={"job_id": job_id})
    assert answer.status_code == 200 and answer.json()["status"] == "cancelling", answer.text
    assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    wait_until(lambda: not folder.exists() or not any(folder.iterdir()), timeout=60,
               what="the copy removed")
