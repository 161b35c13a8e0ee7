"""Jobs through the REST API of a running hypervisord, executed as Prefect flow runs
against a real Prefect server, real qemu-img and libvirt (qemu:///system: the driver the
daemon uses in production; flow runs are separate processes, so the single-process
qemu:///embed driver cannot be shared with them)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from hyper2kvm import ova, qemu_img
from hyper2kvm.detect import detect_format
from hyper2kvm.sample import make_disk
from tests.helpers import (
    boot_sector_disk,
    domain_defined,
    domain_facts,
    make_random_raw,
    make_truncated_ova,
    pool_volumes,
    qemu_img_running_on,
    source_disk_as_raw,
    start_and_stop,
)
from tests.peers import Daemon, Daemons, job_logs, unique, wait_for_job, wait_until


def submit(api: httpx.Client, **job) -> str:
    response = api.post("/jobs/submit", json=job)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "pending" and body["created_at"]
    return body["job_id"]


def test_migration_through_the_api_defines_a_matching_domain(
    api: httpx.Client, daemon: Daemon, sample_vm: str, tmp_path: Path
) -> None:
    job_id = submit(api, vm_identifier=sample_vm, provider="local", export_method="ova")
    seen: list[dict] = []

    def progressed() -> bool:
        progress = api.get(f"/jobs/progress/{job_id}").json()
        seen.append(progress)
        return progress["status"] in ("completed", "failed")

    wait_until(progressed, timeout=120, interval=0.2, what="job end")
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    assert info["vm_identifier"] == sample_vm
    result = info["result"]
    assert result["domain_name"] == sample_vm
    disk = Path(result["disks"][0]["path"])
    assert disk == daemon.images / sample_vm / f"{sample_vm}-disk1.qcow2"
    assert qemu_img.info(disk)["format"] == "qcow2"
    source = source_disk_as_raw(daemon.inbox / f"{sample_vm}.ova", tmp_path / "source.raw")
    assert qemu_img.compare(source, disk), "converted disk differs from the source"
    facts = domain_facts(sample_vm)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 256 * 1024
    assert facts["disks"] == [str(disk)] and facts["macs"] == ["52:54:00:ab:cd:ef"]
    assert facts["machine"].startswith("pc-q35") or facts["machine"] == "q35"
    assert start_and_stop(sample_vm), "the migrated domain does not start"
    assert result["storage_pool"] == f"hypersdk-{sample_vm}"
    assert pool_volumes(result["storage_pool"]) == [disk.name]
    # progress moved through the phases and ended at 100 %
    phases = [p["phase"] for p in seen]
    assert seen[-1]["percentage"] == 100.0
    assert any(p in phases for p in ("export", "transfer", "convert", "register", "completed"))
    assert all(0 <= p["percentage"] <= 100 for p in seen)
    eta = api.get(f"/jobs/eta/{job_id}").json()
    assert eta["eta_seconds"] == 0.0 and eta["percentage"] == 100.0 and eta["elapsed_seconds"] > 0
    # nothing half-written left anywhere
    assert not list(daemon.images.rglob("*.partial"))
    assert not list((daemon.exports / sample_vm).glob(".*"))


def test_logs_are_the_flow_runs_prefect_logs(api: httpx.Client, sample_vm: str) -> None:
    job_id = submit(api, vm_identifier=sample_vm)
    with api.stream("GET", f"/jobs/logs/{job_id}", params={"follow": "true"},
                    timeout=180) as stream:
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    messages = [line["message"] for line in lines]
    assert any("exporting" in m for m in messages)
    assert any("defined libvirt domain" in m for m in messages)
    assert any("Finished in state Completed" in m for m in messages)
    logs = api.get(f"/jobs/logs/{job_id}").json()
    assert logs["status"] == "completed"
    assert [line["message"] for line in logs["logs"]] == messages


def test_report_and_progress_artifacts_are_in_prefect(api: httpx.Client, sample_vm: str) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    job_id = submit(api, vm_identifier=sample_vm)
    assert wait_for_job(api, job_id)["status"] == "completed"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(job_id)])))
    kinds = {a.type: a for a in artifacts}
    assert "progress" in kinds and float(kinds["progress"].data) == 100.0
    report = str(kinds["markdown"].data)
    assert f"libvirt domain: `{sample_vm}`" in report
    assert "SHA-256" in report and "qcow2" in report and "| convert |" in report


def test_list_filters_and_info(api: httpx.Client, sample_vm: str) -> None:
    listed = api.post("/vms/list", json={"provider": "local",
                                         "filter": {"name_pattern": sample_vm}}).json()
    assert [vm["identifier"] for vm in listed["vms"]] == [sample_vm]
    on = api.post("/vms/list", json={"provider": "local", "filter": {"status": "poweredOn"}})
    assert on.json()["count"] == 0
    info = api.get("/vms/info", params={"identifier": sample_vm, "provider": "local"}).json()
    assert info["cpus"] == 2 and info["memory_mb"] == 256 and info["firmware"] == "bios"
    assert info["disks"][0]["capacity_bytes"] == 32 * 2**20
    assert info["nics"][0]["mac"] == "52:54:00:ab:cd:ef"
    missing = api.get("/vms/info", params={"identifier": "no-such-vm", "provider": "local"})
    assert missing.status_code == 404 and "no-such-vm" in missing.json()["message"]


def test_bare_disk_is_packaged_as_an_ova_or_migrated_without_one(
    api: httpx.Client, daemon: Daemon, tmp_path: Path
) -> None:
    name = unique()
    raw = tmp_path / "disk.raw"
    make_disk(raw, size_mib=24, hostname=name)
    qemu_img.convert(qemu_img.DiskSource(raw, "raw"), daemon.inbox / f"{name}.qcow2",
                     output_format="qcow2")
    info = api.get("/vms/info", params={"identifier": name}).json()
    assert info["disks"][0]["format"] == "qcow2"
    assert info["disks"][0]["capacity_bytes"] == 24 * 2**20
    job_id = submit(api, vm_identifier=name, export_method="ova", export_path=f"{name}-ova",
                    hyper2kvm_integration={"enabled": False})
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    packaged = daemon.exports / f"{name}-ova" / f"{name}.ova"
    members = ova.read_members(packaged)
    assert list(members) == [f"{name}.ovf", f"{name}-disk1.vmdk", f"{name}.mf"]
    assert detect_format(packaged, offset=members[f"{name}-disk1.vmdk"].offset) == "vmdk"
    # a migration converts the disk as it is: no OVA packaged only to be unpacked
    job_id = submit(api, vm_identifier=name, export_method="ova")
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    assert info["result"]["export"]["method"] == "disks"
    assert [Path(f["path"]).name for f in info["result"]["export"]["files"]] == [
        f"{name}.qcow2"]
    assert not (daemon.exports / name / f"{name}.ova").exists()
    assert qemu_img.compare(raw, Path(info["result"]["disks"][0]["path"]))


def test_export_only_and_ovf_method(api: httpx.Client, daemon: Daemon, sample_vm: str) -> None:
    job_id = submit(api, vm_identifier=sample_vm, export_method="ovf",
                    export_path=f"{sample_vm}-ovf", hyper2kvm_integration={"enabled": False})
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    folder = daemon.exports / f"{sample_vm}-ovf"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{sample_vm}.ovf", f"{sample_vm}.mf", f"{sample_vm}-disk1.vmdk"])
    assert not domain_defined(sample_vm)
    assert not (daemon.images / sample_vm).exists()
    # the extracted OVF folder converts too (files checked against the manifest)
    job_id = submit(api, vm_identifier=sample_vm, export_method="ovf")
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    assert domain_defined(sample_vm)


def test_daemon_mode_hands_the_export_to_the_watch_daemon_and_waits(
    api: httpx.Client, daemon: Daemon, watch_daemon: object, sample_vm: str
) -> None:
    job_id = submit(api, vm_identifier=sample_vm, hyper2kvm_integration={
        "enabled": True, "daemon_mode": True, "instance": "vsphere"})
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    done = daemon.watch / "vsphere" / "done"
    manifest = json.loads((done / f"{job_id}.json").read_text())
    assert manifest["source_path"].endswith(f"{sample_vm}.ova") and manifest["import_to_kvm"]
    outcome = json.loads((done / f"{job_id}.result.json").read_text())
    assert outcome["status"] == "completed"
    assert info["result"]["domain_name"] == sample_vm and domain_defined(sample_vm)
    assert info["result"]["disks"][0]["path"] == outcome["result"]["disks"][0]["path"]
    assert not list((daemon.watch / "vsphere").glob("*.json"))


def test_failed_conversion_reports_the_reason_and_leaves_nothing(
    api: httpx.Client, daemon: Daemon
) -> None:
    name = unique()
    make_truncated_ova(daemon.inbox, name)
    job_id = submit(api, vm_identifier=name)
    info = wait_for_job(api, job_id)
    assert info["status"] == "failed"
    assert "qemu-img" in info["error"] and name in info["error"]
    logs = api.get(f"/jobs/logs/{job_id}").json()["logs"]
    wait_until(lambda: any("qemu-img" in line["message"] for line in
                           api.get(f"/jobs/logs/{job_id}").json()["logs"]),
               timeout=15, what="the failure in the logs")
    assert logs is not None
    assert not (daemon.images / name).exists()
    assert not domain_defined(name)


def test_cancel_kills_qemu_img_and_removes_partial_output(
    api: httpx.Client, daemon: Daemon
) -> None:
    name = unique()
    source = make_random_raw(daemon.inbox, name, 640)
    # an export-only job packages the OVA (with qemu-img); a migration would not
    job_id = submit(api, vm_identifier=name, export_method="ova",
                    hyper2kvm_integration={"enabled": False})

    def converting() -> bool:
        progress = api.get(f"/jobs/progress/{job_id}").json()
        assert progress["status"] in ("pending", "running"), progress
        return progress["phase"] == "export" and qemu_img_running_on(source)

    wait_until(converting, timeout=90, interval=0.2, what="qemu-img to be running")
    answer = api.post("/jobs/cancel", json={"job_id": job_id})
    assert answer.status_code == 200 and answer.json()["status"] == "cancelling"
    info = wait_for_job(api, job_id, timeout=90)
    assert info["status"] == "cancelled"
    wait_until(lambda: api.get("/jobs/query", params={"job_id": job_id}).json()["state"]
               == "Cancelled", timeout=60, what="Cancelling to end in Cancelled")
    wait_until(lambda: not qemu_img_running_on(source), timeout=30, what="qemu-img to die")
    folder = daemon.exports / name
    leftovers = list(folder.rglob("*")) if folder.exists() else []
    assert leftovers == [], leftovers
    assert not domain_defined(name)
    again = api.post("/jobs/cancel", json={"job_id": job_id})
    assert again.status_code == 409 and "already ended" in again.json()["message"]


def test_cancel_before_start_never_runs(daemons: Daemons, tmp_path: Path) -> None:
    daemon = daemons.start(workers=1)
    busy = unique("busy")  # holds the one slot: its boot check waits ~15 s for a prompt
    boot_sector_disk(daemon.inbox / f"{busy}.raw", b"\r\nbusy login: ", wait_for_key=True)
    waiting = unique("waiting")
    make_random_raw(daemon.inbox, waiting, 8)
    with daemon.client() as client:
        first = submit(client, vm_identifier=busy, hyper2kvm_integration={
            "verify_boot": "warn", "boot_timeout": 120})
        wait_until(lambda: client.get(f"/jobs/progress/{first}").json()["status"] == "running",
                   timeout=60, interval=0.1, what="the first job to take the slot")
        job_id = submit(client, vm_identifier=waiting)
        answer = client.post("/jobs/cancel", json={"job_id": job_id}).json()
        assert answer["status"] == "cancelled", answer  # it had not started: no slot free
        assert wait_for_job(client, first, timeout=300)["status"] == "completed"
        # a later job gets the slot (the runner takes the oldest due run first): the
        # cancelled one, older, was passed over
        later = unique("later")
        make_random_raw(daemon.inbox, later, 8)
        assert wait_for_job(client, submit(client, vm_identifier=later))["status"] == "completed"
        info = client.get("/jobs/query", params={"job_id": job_id}).json()
        assert (info["status"], info["state"]) == ("cancelled", "Cancelled"), info
        assert job_logs(client, job_id) == []
    assert not (daemon.exports / waiting).exists()


def test_retry_of_a_failed_job_skips_finished_steps(api: httpx.Client, daemon: Daemon,
                                                    sample_vm: str) -> None:
    blocker = daemon.images / sample_vm
    daemon.images.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the VM's output folder goes")
    job_id = submit(api, vm_identifier=sample_vm)
    info = wait_for_job(api, job_id)
    assert info["status"] == "failed"
    blocker.unlink()
    retried = api.post("/jobs/retry", json={"job_id": job_id})
    assert retried.status_code == 200, retried.text
    info = wait_for_job(api, job_id, statuses=("completed", "failed"))
    assert info["status"] == "completed", info["error"]
    # Prefect ships logs in batches: wait for the run's last line
    messages = wait_until(lambda: (lines := job_logs(api, job_id)) and any(
        line.startswith("migration of") for line in lines) and lines, timeout=60,
        what="the run's last log line")
    assert sum("exporting" in m for m in messages) == 1, "export ran twice"
    assert sum("staged 1 disk" in m for m in messages) == 1, "transfer ran twice"
    assert sum(m.startswith("converted ") for m in messages) == 1
    assert any("Cached" in m for m in messages)
    assert domain_defined(sample_vm)
    done = api.post("/jobs/retry", json={"job_id": job_id})
    assert done.status_code == 409


def test_exports_take_a_slot_of_the_global_concurrency_limit(daemon: Daemon) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("hypersdk-exports")
    assert limit.limit == 2


def test_job_listing_pages_and_filters(api: httpx.Client, daemon: Daemon,
                                      sample_vm: str) -> None:
    from hyper2kvm.sample import make_sample_ova

    other = unique()
    make_sample_ova(daemon.inbox, other, size_mib=16)
    jobs = api.post("/jobs/submit", json=[{"vm_identifier": vm,
                                           "hyper2kvm_integration": {"enabled": False}}
                                          for vm in (sample_vm, other)]).json()["jobs"]
    assert len(jobs) == 2
    for job in jobs:
        assert wait_for_job(api, job["job_id"])["status"] == "completed"
    page = api.get("/jobs/query", params={"status": "completed", "limit": 1}).json()
    assert page["limit"] == 1 and len(page["jobs"]) == 1 and page["total"] >= 2
    assert all(job["status"] == "completed" for job in page["jobs"])
    second = api.get("/jobs/query", params={"status": "completed", "limit": 1,
                                            "offset": 1}).json()
    assert second["jobs"][0]["job_id"] != page["jobs"][0]["job_id"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"vm_identifier": "x", "provider": "nimbus"}, 422, "unknown provider 'nimbus'"),
        ({"provider": "local"}, 422, "vm_identifier: field required"),
        ({"vm_identifier": "x", "export_method": "zip"}, 422, "export_method"),
        ({"vm_identifier": "x", "colour": "red"}, 422, "colour: unknown field"),
        ({"vm_identifier": "no-such-vm"}, 404, "no VM 'no-such-vm'"),
    ],
)
def test_bad_jobs_are_refused_clearly(api: httpx.Client, body: dict, status: int,
                                      needle: str) -> None:
    response = api.post("/jobs/submit", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["message"]


@pytest.mark.parametrize("path", ["../escape", "/etc/hypersdk", "a/../../b"])
def test_export_path_escapes_are_refused(api: httpx.Client, sample_vm: str, path: str) -> None:
    response = api.post("/jobs/submit", json={"vm_identifier": sample_vm, "export_path": path})
    assert response.status_code == 422
    assert "outside" in response.json()["message"]


def test_symlink_escape_is_refused(api: httpx.Client, daemon: Daemon, sample_vm: str,
                                   tmp_path: Path) -> None:
    link = daemon.exports / unique("link")
    link.symlink_to(tmp_path)
    response = api.post("/jobs/submit", json={"vm_identifier": sample_vm,
                                              "export_path": f"{link.name}/vm"})
    assert response.status_code == 422 and "outside" in response.json()["message"]


def test_malformed_json_and_unknown_jobs(api: httpx.Client) -> None:
    response = api.post("/jobs/submit", content=b'{"vm_identifier": ',
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "malformed JSON" in response.json()["message"]
    for job_id in ("job-abc-123", "00000000-0000-0000-0000-000000000000"):
        for path in (f"/jobs/progress/{job_id}", f"/jobs/eta/{job_id}", f"/jobs/logs/{job_id}"):
            answer = api.get(path)
            assert answer.status_code == 404 and job_id in answer.json()["message"]
        answer = api.get("/jobs/query", params={"job_id": job_id})
        assert answer.status_code == 404
        assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 404


def test_parse_vmdk_endpoint_reads_in_place_and_stays_in_its_roots(
    api: httpx.Client, daemon: Daemon, sample_vm: str
) -> None:
    ova_path = daemon.inbox / f"{sample_vm}.ova"
    parsed = api.get("/parse-vmdk", params={"path": str(ova_path)}).json()
    disk = parsed["disks"][f"{sample_vm}-disk1.vmdk"]
    assert disk["create_type"] == "streamOptimized" and disk["capacity_bytes"] == 32 * 2**20
    assert disk["header"]["compression"] == "deflate"
    for bad in ("/etc/passwd", str(daemon.inbox / ".." / ".." / "x.vmdk"), "relative.vmdk"):
        answer = api.get("/parse-vmdk", params={"path": bad})
        assert answer.status_code == 422, answer.text
    missing = api.get("/parse-vmdk", params={"path": str(daemon.inbox / "nope.vmdk")})
    assert missing.status_code == 422 and "not a file" in missing.json()["message"]


def test_import_to_kvm_defines_a_domain_around_a_disk(
    api: httpx.Client, daemon: Daemon, tmp_path: Path
) -> None:
    name = unique()
    folder = daemon.images / name
    folder.mkdir(parents=True)
    disk = folder / "disk.qcow2"
    raw = tmp_path / "d.raw"
    make_disk(raw, size_mib=16)
    qemu_img.convert(qemu_img.DiskSource(raw, "raw"), disk, output_format="qcow2")
    body = {"vm_name": name, "disk_path": str(disk), "memory_mb": 512, "vcpus": 2,
            "network": "user", "autostart": True}
    answer = api.post("/import-to-kvm", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["vm_name"] == name and result["autostart"] and result["format"] == "qcow2"
    facts = domain_facts(name)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 512 * 1024
    assert facts["disks"] == [str(disk)]
    again = api.post("/import-to-kvm", json=body)
    assert again.status_code == 409 and "already exists" in again.json()["message"]
    outside = api.post("/import-to-kvm", json={**body, "disk_path": "/etc/hostname"})
    assert outside.status_code == 422
    bad_name = api.post("/import-to-kvm", json={**body, "vm_name": "a b/c"})
    assert bad_name.status_code == 422


def test_convert_endpoint_runs_a_convert_vm_flow(api: httpx.Client, daemon: Daemon,
                                                 sample_vm: str, tmp_path: Path) -> None:
    source = daemon.inbox / f"{sample_vm}.ova"
    body = {"source_path": str(source), "output_path": f"{sample_vm}-converted",
            "conversion_options": {"format": "raw", "compression": False},
            "import_to_kvm": True}
    answer = api.post("/convert", json=body)
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["job_id"]
    info = wait_for_job(api, job_id)
    assert info["status"] == "completed", info["error"]
    assert info["vm_identifier"] == sample_vm
    disk = Path(info["result"]["disks"][0]["path"])
    assert disk == daemon.images / f"{sample_vm}-converted" / f"{sample_vm}-disk1.raw"
    assert qemu_img.compare(source_disk_as_raw(source, tmp_path / "s.raw"), disk)
    assert domain_facts(sample_vm)["disks"] == [str(disk)]
    assert api.get(f"/jobs/progress/{job_id}").json()["percentage"] == 100.0
    listed = api.get("/jobs/query", params={"limit": 50}).json()["jobs"]
    assert job_id in [job["job_id"] for job in listed]
    for bad in ({**body, "source_path": "/etc/passwd"},
                {**body, "output_path": "../../elsewhere"},
                {**body, "conversion_options": {"format": "vdi"}}):
        refused = api.post("/convert", json=bad)
        assert refused.status_code == 422, refused.text
