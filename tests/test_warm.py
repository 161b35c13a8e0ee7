"""Warm migration of a disk that keeps changing: a local qcow2 (qemu-io writes into it), an
EC2 volume (moto snapshots a file the test rewrites) and a vSphere VM with CBT (the test
writes its flat extent on vcsim's datastore). Each: the precopy, sync rounds that write
only what changed, a cutover (the REST API, Prefect's resume as the UI's form sends it,
`cutover_at`), and a result equal, byte for byte, to the source as it was at the cutover."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml
from prefect.client.orchestration import get_client
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from hyper2kvm import qemu_img
from tests.aws_sim import Moto
from tests.helpers import MIB, boot_sector_disk, domain_defined
from tests.peers import Daemon, Daemons, job_logs, unique, wait_for_job, wait_until
from tests.test_metrics import scrape, value
from tests.vsphere_sim import Vcsim, create_vm, give_disk_content


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


def submit_warm(api: httpx.Client, name: str, *, provider: str = "local",
                **options: object) -> str:
    answer = api.post("/jobs/submit", json={
        "vm_identifier": name, "provider": provider, "options": {"warm": True, **options},
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
                               and p["round"] is not None and p["round"] >= number else None)(
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
    assert first["phase"] == "sync" and first["changed_bytes"] == 9 * MIB, first
    assert api.get("/jobs/query", params={"job_id": job_id}).json()["status"] == "waiting"
    # Prefect's Paused is the job.waiting event, which the metrics count
    wait_until(lambda: value(scrape(api), "hypersdk_jobs", status="waiting") >= 1,
               timeout=30, what="the waiting job in hypersdk_jobs")

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


def rewrite(content: Path, offset: int, data: bytes) -> None:
    """What the instance's guest writes (the extended moto snapshots this file)."""
    with content.open("r+b") as volume:
        volume.seek(offset)
        volume.write(data)


def test_an_ec2_instance_is_synced_by_changed_blocks_and_stopped_for_the_cutover(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    content = tmp_path / "volume.raw"
    content.write_bytes(os.urandom(8 * MIB))
    instance = moto.instance(unique("warm-ec2"), volumes_gib=[1], contents=[content],
                             stopped=False)
    instance_id = instance["InstanceId"]
    job_id = submit_warm(api, instance_id, provider="aws", precopy_interval=5,
                         shutdown_vm=True, shutdown_timeout=30)
    first = waiting_after_round(api, job_id, 0)
    assert first["changed_bytes"] == 8 * MIB, first  # the blocks holding data

    rewrite(content, 2 * MIB, os.urandom(MIB))
    rewrite(content, 6 * MIB, bytes(MIB // 2))  # a block of zeros: no longer listed
    written = progress(api, job_id)["round"] or 0
    waiting_after_round(api, job_id, written + 2)
    assert moto.instance_state(instance_id) == "running"

    rewrite(content, 7 * MIB, os.urandom(MIB // 2))
    assert api.post("/jobs/cutover", json={"job_id": job_id}).status_code == 200
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    assert qemu_img.compare(content, copy_of(info)), "the copy is not the volume at cutover"
    rounds = info["result"]["warm"]["rounds"]
    # after the precopy, only the 512 KiB blocks that changed: 1.5 MiB, then 0.5 MiB
    assert sum(r["changed_bytes"] for r in rounds[1:]) == 2 * MIB, rounds
    assert moto.instance_state(instance_id) == "stopped"  # shutdown_vm: off for the cutover
    assert moto.snapshots_of_job(job_id) == []  # every round's snapshots removed
    logs = job_logs(api, job_id)
    assert sum(" round " in line and "bytes changed" in line for line in logs) == len(rounds)


def test_a_vsphere_vm_is_synced_by_changed_block_tracking_and_powered_off_for_the_cutover(
        api: httpx.Client, daemon: Daemon, vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    name = unique("warm-vs")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(6 * MIB) + bytes(10 * MIB))
    vm = create_vm(si, name, disks_mib=[16])
    give_disk_content(vcsim, vm, [image], layout="flat")
    WaitForTask(vm.PowerOnVM_Task())
    off = api.post("/jobs/submit", json={"vm_identifier": vm._moId, "provider": "vsphere",
                                         "options": {"warm": True}})
    assert off.status_code == 422 and "Changed Block Tracking off" in off.json()["message"]

    job_id = submit_warm(api, vm._moId, provider="vsphere", precopy_interval=5,
                         enable_cbt=True)
    first = waiting_after_round(api, job_id, 0)
    assert first["changed_bytes"] == 6 * MIB, first  # CBT's areas in use: the data only
    flat = Path(vcsim.datastores["LocalDS_0"]) / name / f"{name}-flat.vmdk"
    rewrite(flat, MIB, os.urandom(256 << 10))  # the running guest writes
    rewrite(flat, 10 * MIB, os.urandom(128 << 10))
    written = progress(api, job_id)["round"] or 0
    waiting_after_round(api, job_id, written + 2)
    assert vm.runtime.powerState == "poweredOn"

    rewrite(flat, 3 * MIB, bytes(64 << 10))
    assert api.post("/jobs/cutover", json={"job_id": job_id}).status_code == 200
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    assert qemu_img.compare(flat, copy_of(info)), "the copy is not the disk at cutover"
    rounds = info["result"]["warm"]["rounds"]
    # after the precopy, only the 64 KiB blocks CBT reported: 384 KiB, then 64 KiB
    assert sum(r["changed_bytes"] for r in rounds[1:]) == 448 << 10, rounds
    assert vm.runtime.powerState == "poweredOff"  # off for the last round
    assert not snapshot_names(si, vm)  # every round's snapshot removed
    assert vm.config.changeTrackingEnabled
    assert not list(copy_of(info).parent.glob(".*"))  # no partial, no CBT state left

    undone = api.post("/jobs/rollback", json={"job_id": job_id, "remove_disks": True})
    assert undone.status_code == 200, undone.text
    assert "powered on again" in undone.json()["message"], undone.text
    assert vm.runtime.powerState == "poweredOn"  # the cutover stopped it; the rollback not
    assert not copy_of(info).exists() and not domain_defined(name)


def snapshot_names(si: Any, vm: Any) -> list[str]:
    """Through the PropertyCollector: vcsim panics fetching an unset `snapshot`."""
    collector = si.RetrieveContent().propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=vm)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine,
                                                            pathSet=["snapshot"])])
    found = collector.RetrieveContents([spec])
    info = next((p.val for o in found for p in o.propSet or []), None)
    names: list[str] = []

    def walk(trees: list[Any]) -> None:
        for tree in trees:
            names.append(tree.name)
            walk(tree.childSnapshotList)

    walk(info.rootSnapshotList if info else [])
    return names


def test_a_failed_sync_round_is_retried_and_the_copy_stays_whole(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    """A block the guest wrote after the precopy cannot be read (500s): the round fails
    after its one retry per block, Prefect retries the round, which (once the block
    reads again) compares with the last round copied whole, not the failed one's
    snapshot, so the block is in the copy. A cancel while waiting removes the snapshots
    the job kept for its next round."""
    content = tmp_path / "volume.raw"
    content.write_bytes(os.urandom(4 * MIB))
    instance = moto.instance(unique("warm-fail"), volumes_gib=[1], contents=[content],
                             stopped=False)
    volume = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    ec2 = moto.client("ec2")
    config = daemon.config.read_text()
    settings = yaml.safe_load(config)
    settings["export"].update(throttle_budget=0, part_retries=1)
    daemon.config.write_text(yaml.safe_dump(settings))  # each round reads it
    try:
        job_id = submit_warm(api, instance["InstanceId"], provider="aws", precopy_interval=5)
        waiting_after_round(api, job_id, 0)
        ec2.create_tags(Resources=[volume], Tags=[{"Key": "moto-test:fail-blocks",
                                                   "Value": "12:1000"}])
        rewrite(content, 12 * (512 << 10), os.urandom(512 << 10))  # block 12, new
        logged(api, job_id, "Retry 1/2")  # a round failed; Prefect retries it
        ec2.delete_tags(Resources=[volume], Tags=[{"Key": "moto-test:fail-blocks"}])
        written = progress(api, job_id)["round"] or 0
        waiting_after_round(api, job_id, written + 1)
        assert moto.snapshots_of_job(job_id), "the last round's snapshots are kept"
        assert api.post("/jobs/cutover", json={"job_id": job_id}).status_code == 200
        info = wait_for_job(api, job_id, timeout=300)
    finally:
        daemon.config.write_text(config)
    assert info["status"] == "completed", info["error"]
    assert qemu_img.compare(content, copy_of(info)), "the block the failed round missed"
    assert moto.snapshots_of_job(job_id) == []

    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(MIB))
    instance = moto.instance(unique("warm-cancel"), volumes_gib=[1], contents=[other],
                             stopped=False)
    job_id = submit_warm(api, instance["InstanceId"], provider="aws", precopy_interval=3600)
    waiting_after_round(api, job_id, 0)
    assert moto.snapshots_of_job(job_id)
    assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
    assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    wait_until(lambda: moto.snapshots_of_job(job_id) == [], timeout=60,
               what="the cancelled job's snapshots removed")


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

    for provider in ("azure", "gcp"):
        refused = api.post("/jobs/submit", json={"vm_identifier": "i-any", "provider": provider,
                                                 "options": {"warm": True}})
        assert refused.status_code == 422, refused.text
        assert f"not available for provider {provider}" in refused.json()["message"]
    dry = api.post("/jobs/submit", json={"vm_identifier": name, "dry_run": True, "options": {
        "warm": True, "keep_export": True}})
    assert dry.status_code == 200, dry.text
    assert "warm_not_available" in [b["code"] for b in dry.json()["blockers"]], dry.text
    ova = api.post("/jobs/submit", json={"vm_identifier": sample_vm, "options": {"warm": True}})
    assert ova.status_code == 422 and "OVA or OVF" in ova.json()["message"], ova.text
    outside = daemon.root / "secret.raw"  # a file of the host, outside the inbox
    outside.write_bytes(b"not yours" * 1000)
    hostile = unique("warm-backing")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(outside), str(daemon.inbox / f"{hostile}.qcow2")], check=True)
    refused = api.post("/jobs/submit", json={"vm_identifier": hostile,
                                             "options": {"warm": True}})
    assert refused.status_code in (400, 422) and "backing" in refused.json()["message"], \
        refused.text
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


def logged(api: httpx.Client, job_id: str, text: str) -> None:
    wait_until(lambda: any(text in line for line in job_logs(api, job_id)), timeout=300,
               what=f"{text!r} in the job's logs")


def test_a_test_boot_boots_the_copy_while_it_waits_and_a_rollback_undoes_the_cutover(
        api: httpx.Client, daemon: Daemon) -> None:
    name = unique("warm-boot")
    disk = boot_sector_disk(daemon.inbox / f"{name}.raw", f"\r\n{name} login: ".encode())
    job_id = submit_warm(api, name, precopy_interval=3600)
    too_early = api.post("/jobs/rollback", json={"job_id": job_id})
    assert too_early.status_code == 409 and "cut over" in too_early.json()["message"]
    waiting_after_round(api, job_id, 0)
    asked = api.post("/jobs/test-boot", json={"job_id": job_id})
    assert asked.status_code == 200, asked.text
    logged(api, job_id, f"test boot of {name}: booted")
    waiting_after_round(api, job_id, 0)  # back to waiting for its cutover
    assert not domain_defined(name)  # a test boot defines nothing

    assert api.post("/jobs/cutover", json={"job_id": job_id}).status_code == 200
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    boots = info["result"]["warm"]["test_boots"]
    assert [b["booted"] for b in boots] == [True], boots
    assert f"{name} login: " in boots[0]["reason"], boots
    assert qemu_img.compare(disk, copy_of(info))  # the test boot wrote nothing into it
    assert domain_defined(name)
    again = api.post("/jobs/test-boot", json={"job_id": job_id})
    assert again.status_code == 409 and "between its sync rounds" in again.json()["message"]

    undone = api.post("/jobs/rollback", json={"job_id": job_id})
    assert undone.status_code == 200, undone.text
    assert f"domain {name} undefined" in undone.json()["message"]
    assert not domain_defined(name) and copy_of(info).is_file()  # the disks are kept
    shown = api.get("/jobs/query", params={"job_id": job_id}).json()
    assert shown["rolled_back_at"] and "disks kept" in shown["rollback"], shown
    twice = api.post("/jobs/rollback", json={"job_id": job_id})
    assert twice.status_code == 409 and "rolled back already" in twice.json()["message"]


def test_a_wave_cuts_over_in_dependency_order_and_a_failed_upstream_fails_its_followers(
        api: httpx.Client, daemon: Daemon) -> None:
    first, _ = running_vm(daemon)
    second, _ = running_vm(daemon)
    warm = {"warm": True, "precopy_interval": 3600}
    h2k = {"convert_guest": False, "verify_boot": "off"}
    cyclic = api.post("/jobs/submit", json=[
        {"vm_identifier": first, "options": warm, "after": [second]},
        {"vm_identifier": second, "options": warm, "after": [first]}])
    assert cyclic.status_code == 422 and "cycle" in cyclic.json()["message"], cyclic.text
    unknown = api.post("/jobs/submit", json=[{"vm_identifier": first, "after": ["nobody"]}])
    assert unknown.status_code == 422 and "'nobody'" in unknown.json()["message"]
    gone = str(UUID(int=7))
    missing = api.post("/jobs/submit", json={"vm_identifier": first, "after": [gone]})
    assert missing.status_code == 422 and "does not exist" in missing.json()["message"]
    listed = api.get("/jobs/query", params={"limit": 200}).json()["jobs"]
    assert not [j for j in listed if j["vm_identifier"] in (first, second)]  # none made

    window = (datetime.now(UTC) + timedelta(seconds=15)).isoformat()
    both = {**warm, "cutover_at": window}
    answer = api.post("/jobs/submit", json=[
        {"vm_identifier": first, "options": both, "after": [second],
         "hyper2kvm_integration": h2k},
        {"vm_identifier": second, "options": both, "hyper2kvm_integration": h2k}])
    assert answer.status_code == 200, answer.text
    first_id, second_id = (j["job_id"] for j in answer.json()["jobs"])
    done = {job_id: wait_for_job(api, job_id, timeout=300) for job_id in (first_id, second_id)}
    assert all(d["status"] == "completed" for d in done.values()), done
    assert done[first_id]["definition"]["after"] == [second_id]
    # the follower's last round began once its upstream job had completed
    assert (datetime.fromisoformat(done[first_id]["result"]["warm"]["cutover_at"])
            >= datetime.fromisoformat(done[second_id]["finished_at"]))

    third, _ = running_vm(daemon)
    upstream = submit_warm(api, third, precopy_interval=3600)
    follower = api.post("/jobs/submit", json={"vm_identifier": second, "after": [upstream],
                                              "hyper2kvm_integration": {
                                                  **h2k, "replace_existing": True}})
    assert follower.status_code == 200, follower.text
    waiting_after_round(api, upstream, 0)
    assert api.post("/jobs/cancel", json={"job_id": upstream}).status_code == 200
    failed = wait_for_job(api, follower.json()["job_id"], timeout=120)
    assert failed["status"] == "failed"
    assert f"job {upstream}" in failed["error"] and "Cancel" in failed["error"], failed


def test_a_warm_job_waiting_for_its_cutover_survives_a_daemon_sigkill(
        daemons: Daemons) -> None:
    """hypervisord SIGKILLed while the job waits: the job is Paused with no process. The
    next start runs it again, and its precopy continues the copy it left: only what the
    guest wrote meanwhile is written."""
    daemon = daemons.start()
    name, disk = running_vm(daemon)
    with daemon.client() as api:
        job_id = submit_warm(api, name, precopy_interval=3600)
        waiting_after_round(api, job_id, 0)
    assert (daemon.images / name / f".{name}-disk1.qcow2.partial").is_file()
    daemon.process.kill()
    daemon.process.wait()
    write(disk, "write -P 0x77 30M 2M")  # the guest works on while hypervisord is down
    again = daemons.restart(daemon)
    with again.client() as api:
        wait_until(lambda: (lambda p: p["status"] == "waiting" and p["changed_bytes"]
                            == 2 * MIB)(progress(api, job_id)), timeout=180, interval=0.3,
                   what="the resumed job waiting again, its copy continued")
        assert api.post("/jobs/cutover", json={"job_id": job_id}).status_code == 200
        info = wait_for_job(api, job_id, timeout=180)
        assert info["status"] == "completed", info["error"]
        assert qemu_img.compare(disk, copy_of(info))
        assert info["result"]["warm"]["rounds"][0]["changed_bytes"] == 2 * MIB
