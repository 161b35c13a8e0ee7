"""The GCP provider: its control plane against the Compute + Cloud Build stand-in
(tests/gcp_standin.py) driven by the real google-cloud-compute / google-cloud-build
clients and a real service-account key, its bytes from gcp-storage-emulator through
google-cloud-storage. Inventory through the REST API, a migration end to end, a ranged
read that fails then succeeds, a cancel while the cloud-side export runs, refused
credentials, a missing instance, a running instance stopped and started again."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from core.config import Config, GCPProviderConfig
from core.errors import (
    AuthFailed,
    InvalidRequest,
    NotFound,
    ProviderError,
    Transient,
    VerificationError,
)
from core.models import ExportOptions, VMFilter
from hyper2kvm import qemu_img
from hyper2kvm.sample import make_disk
from providers.gcp import GCPProvider
from tests.gcp_sim import GCP
from tests.gcp_standin import service_account_key
from tests.helpers import domain_facts, domain_firmware, start_and_stop
from tests.peers import EXPORTS, Daemon, free_port, unique, wait_for_job, wait_until
from tests.test_jobs import submit

MIB = 1 << 20


def _images(tmp_path: Path, name: str) -> list[Path]:
    boot, data = tmp_path / "boot.raw", tmp_path / "data.raw"
    make_disk(boot, size_mib=24, hostname=name)
    with data.open("wb") as out:
        out.write(b"gcp data " * (1 << 20))
        out.seek(40 * MIB)
        out.write(b"tail" * (1 << 18))
    return [boot, data]


def _provider(gcp: GCP, **overrides: object) -> GCPProvider:
    return GCPProvider(GCPProviderConfig.model_validate(gcp.section(**overrides)),
                       settings=Config())


def _leftovers(gcp: GCP, name: str) -> list[str]:
    images = [i["name"] for i in gcp.standin.images() if name[:20] in i["name"]]
    return images + [o for o in gcp.objects() if name[:20] in o]


def test_inventory_through_the_api(api: httpx.Client, gcp: GCP) -> None:
    env = unique("env")
    web = gcp.standin.add_instance("us-east1-b", unique("web"), machine_type="n2-standard-4",
                                   disks=[(2, None), (1, None)], running=True, uefi=True,
                                   secure_boot=True, labels={"env": env}, nics=2,
                                   interface="NVME")
    db_name = unique("db")
    gcp.standin.add_instance("europe-west1-c", db_name, machine_type="e2-micro",
                             disks=[(1, None)], labels={"env": env, "tier": "data"})
    web_name = next(i["name"] for i in gcp.standin.state.instances.values() if i["id"] == web)
    caps = api.get("/capabilities").json()["providers"]["gcp"]
    assert caps["configured"] and caps["usable"], caps

    def listed(**flt: object) -> list[str]:
        answer = api.post("/vms/list", json={"provider": "gcp", "filter": flt})
        assert answer.status_code == 200, answer.text
        return sorted(v["identifier"] for v in answer.json()["vms"])

    assert listed(tags=[f"env={env}"]) == [f"europe-west1-c/{db_name}", f"us-east1-b/{web_name}"]
    assert listed(tags=[f"env={env}"], status="poweredOn") == [f"us-east1-b/{web_name}"]
    assert listed(tags=[f"env={env}", "tier=data"]) == [f"europe-west1-c/{db_name}"]
    assert listed(tags=[f"env={env}"], datacenter="europe-west1-c") == [
        f"europe-west1-c/{db_name}"]
    assert listed(tags=[f"env={env}"], name_pattern="web*") == [f"us-east1-b/{web_name}"]

    info = api.get("/vms/info", params={"provider": "gcp", "identifier": web_name}).json()
    assert info["cpus"] == 4 and info["memory_mb"] == 16384  # n2-standard-4
    assert info["firmware"] == "efi" and info["secure_boot"] is True
    assert info["architecture"] == "x86_64" and info["guest_os"] == "linux"
    assert [d["capacity_bytes"] for d in info["disks"]] == [2 << 30, 1 << 30]
    assert [d["controller"] for d in info["disks"]] == ["nvme", "nvme"]
    nics = info["nics"]
    assert [n["network"] for n in nics] == ["default", "net1"]
    assert all(n["mac_derived"] and n["mac"].startswith("52:54:00:") for n in nics)
    assert nics[0]["mac"] != nics[1]["mac"]
    again = api.get("/vms/info", params={"provider": "gcp",
                                         "identifier": f"us-east1-b/{web_name}"}).json()
    assert [n["mac"] for n in again["nics"]] == [n["mac"] for n in nics]  # stable
    db = api.get("/vms/info", params={"provider": "gcp", "identifier": db_name}).json()
    assert db["cpus"] == 2 and db["memory_mb"] == 1024 and db["firmware"] == "bios"
    missing = api.get("/vms/info", params={"provider": "gcp",
                                           "identifier": "us-east1-b/nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["message"]


def test_migration_ends_with_matching_domain_and_nothing_left_in_the_project(
        api: httpx.Client, daemon: Daemon, gcp: GCP, tmp_path: Path) -> None:
    name = unique("t-gcp")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, machine_type="e2-micro", uefi=True,
                             running=True, disks=[(1, images[0]), (1, images[1])])
    # the first ranged read at offset 0 fails twice before it is served: retried on its own
    gcp.faults.fail[0] = 2
    job_id = submit(api, vm_identifier=f"us-central1-a/{name}", provider="gcp",
                    hyper2kvm_integration={"replace_existing": True})
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    assert gcp.faults.fail[0] == 0, "the failing range was never asked for"
    result = info["result"]
    disks = [Path(d["path"]) for d in result["disks"]]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the GCP disk"
    facts = domain_facts(name)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 1024 * 1024  # e2-micro
    vm = api.get("/vms/info", params={"provider": "gcp", "identifier": name}).json()
    assert facts["macs"] == [vm["nics"][0]["mac"]] and vm["nics"][0]["mac_derived"]
    assert domain_firmware(name) == "efi"
    assert start_and_stop(name)
    files = result["export"]["files"]
    assert [Path(f["path"]).suffix for f in files] == [".qcow2", ".qcow2"]
    logs = "\n".join(line["message"] for line in
                     api.get(f"/jobs/logs/{job_id}").json()["logs"])
    assert "CRC32C checked" in logs and "range reads retried" in logs
    assert "export build" in logs and "SUCCESS" in logs
    assert _leftovers(gcp, name) == []


def test_cancel_during_the_cloud_export_cancels_the_build_and_removes_the_image(
        api: httpx.Client, daemon: Daemon, gcp: GCP, tmp_path: Path) -> None:
    name = unique("t-gcp-cancel")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[0])])
    gcp.standin.state.build_seconds = 120
    try:
        job_id = submit(api, vm_identifier=f"us-central1-a/{name}", provider="gcp")

        def building() -> list[dict]:
            return [b for b in gcp.standin.builds() if b["status"] == "WORKING"
                    and any(name[:20] in a for a in b["steps"][0]["args"])]

        wait_until(lambda: bool(building()), timeout=120, what="the export build to run")
        build = building()[0]
        assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
        assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    finally:
        gcp.standin.state.build_seconds = 0.5
    wait_until(lambda: gcp.standin.state.builds[build["id"]]["status"] == "CANCELLED",
               timeout=60, what="the build to be cancelled")
    wait_until(lambda: not _leftovers(gcp, name), timeout=60,
               what="the image to be deleted")
    assert not [p for p in EXPORTS.rglob(f"*{name}*") if p.is_file()]


def test_running_instance_stopped_exported_as_vmdk_and_started_again(
        gcp: GCP, tmp_path: Path) -> None:
    name = unique("t-gcp-run")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, running=True,
                             disks=[(1, images[0]), (1, images[1])])
    seen: list[str] = []
    moved: list[int] = []

    def progress(count: int) -> None:
        moved.append(count)
        seen.append(gcp.standin.status("us-central1-a", name))

    result = _provider(gcp).export(f"us-central1-a/{name}", tmp_path / "out", method="vmdk",
                                   options=ExportOptions(shutdown_vm=True,
                                                         restore_power_state=True),
                                   progress=progress, job="run-job")
    # stopped while its disks were captured as images, started again after
    assert gcp.standin.statuses_at_image(name) == ["TERMINATED", "TERMINATED"], seen
    assert gcp.standin.status("us-central1-a", name) == "RUNNING"
    assert sum(moved) > 0
    disks = [f.path for f in result.files if f.role == "disk"]
    assert [p.suffix for p in disks] == [".vmdk", ".vmdk"]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk)
    assert _leftovers(gcp, name) == []


def test_an_object_whose_crc32c_does_not_match_is_refused(gcp: GCP, tmp_path: Path) -> None:
    name = unique("t-gcp-crc")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[1])])
    gcp.faults.corrupt.add(0)  # the proxy flips a byte of the read at offset 0
    try:
        with pytest.raises(VerificationError, match="crc32c"):
            _provider(gcp).export(f"us-central1-a/{name}", tmp_path / "out", method="disks",
                                  options=ExportOptions(), job="crc-job")
    finally:
        gcp.faults.corrupt.clear()
    assert list((tmp_path / "out").iterdir()) == []
    assert _leftovers(gcp, name) == []


def test_refused_credentials_missing_instance_unreachable_api_and_no_bucket(
        gcp: GCP, tmp_path: Path) -> None:
    stranger = json.loads(gcp.standin.key_file.read_text())
    stranger["private_key"] = service_account_key()[0].decode()
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(stranger))
    with pytest.raises(AuthFailed, match="refused"):
        _provider(gcp, credentials_file=str(forged)).list_vms(VMFilter())
    with pytest.raises(NotFound, match="nope"):
        _provider(gcp).get_vm("us-central1-a/nope")
    with pytest.raises(NotFound, match="no instance 'nobody-has-this-name'"):
        _provider(gcp).get_vm("nobody-has-this-name")
    with pytest.raises(Transient, match="cannot reach GCP"):
        _provider(gcp, compute_endpoint=f"http://127.0.0.1:{free_port()}").list_vms(VMFilter())
    provider = _provider(gcp, export_bucket=None)
    vm = _provider(gcp).list_vms(VMFilter())[0]
    with pytest.raises(InvalidRequest, match="export_bucket"):
        provider.check_export(provider.get_vm(vm.identifier), ExportOptions(), converts=True)


def test_local_ssds_are_listed_a_dry_run_blocker_and_left_out_when_asked(
        api: httpx.Client, gcp: GCP, tmp_path: Path) -> None:
    """A local SSD (SCRATCH, no source disk) cannot be imaged: the instance lists it, the
    dry run names it as the blocker, and with skip_local_disks the export leaves it out."""
    name = unique("t-gcp-ssd")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[0])], local_ssds=1)
    identifier = f"us-central1-a/{name}"
    vm = api.get("/vms/info", params={"provider": "gcp", "identifier": identifier}).json()
    assert [(d["name"], d["local"]) for d in vm["disks"]] == [
        (f"{name}-disk0", False), ("local-ssd-0", True)]
    dry = api.post("/jobs/submit", json={"vm_identifier": identifier, "provider": "gcp",
                                         "dry_run": True}).json()
    assert [b["code"] for b in dry["blockers"]] == ["local_disk"], dry
    assert "local-ssd-0" in dry["blockers"][0]["message"]
    assert _leftovers(gcp, name) == []  # the dry run made nothing
    result = _provider(gcp).export(identifier, tmp_path / "out", method="disks",
                                   options=ExportOptions(skip_local_disks=True), job="ssd-job")
    assert [d.name for d in result.vm.disks] == [f"{name}-disk0"]
    assert [f.role for f in result.files] == ["disk"]
    assert qemu_img.compare(images[0], result.files[0].path)
    assert _leftovers(gcp, name) == []


def test_a_project_without_the_default_network_needs_export_network(
        gcp: GCP, tmp_path: Path) -> None:
    """The image export tool starts a worker VM on the "default" network unless told
    otherwise; a project without one fails the build after it started. The blocker says
    so first; with providers.gcp.export_network the build gets -network and works."""
    name = unique("t-gcp-vpc")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[1])])
    identifier = f"us-central1-a/{name}"
    networks = gcp.standin.state.networks
    gcp.standin.state.networks = {"corp-vpc"}
    try:
        bare = _provider(gcp)
        vm = bare.get_vm(identifier)
        blockers = bare.blockers(vm, ExportOptions(), converts=False)
        assert [b.code for b in blockers] == ["export_network_missing"], blockers
        assert "export_network" in blockers[0].message
        with pytest.raises(ProviderError, match="network 'default' not found"):
            bare.export(identifier, tmp_path / "failed", method="disks",
                        options=ExportOptions(), job="vpc-bad")
        routed = _provider(gcp, export_network="corp-vpc", export_subnet="corp-a",
                           export_zone="us-central1-a")
        assert routed.blockers(vm, ExportOptions(), converts=False) == []
        result = routed.export(identifier, tmp_path / "out", method="disks",
                               options=ExportOptions(), job="vpc-job")
    finally:
        gcp.standin.state.networks = networks
    assert qemu_img.compare(images[1], result.files[0].path)
    args = [b["steps"][0]["args"] for b in gcp.standin.state.builds.values()
            if "hypersdk-vpc-job" in b["tags"]]
    assert len(args) == 1 and {"-network=corp-vpc", "-subnet=corp-a",
                               "-zone=us-central1-a"} <= set(args[0]), args
    assert _leftovers(gcp, name) == []


def test_a_disk_the_account_may_not_image_is_a_blocker_found_with_test_iam_permissions(
        gcp: GCP, tmp_path: Path) -> None:
    name = unique("t-gcp-iam")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[1])])
    provider = _provider(gcp)
    vm = provider.get_vm(f"us-central1-a/{name}")
    gcp.standin.state.denied = {"compute.disks.useReadOnly"}
    try:
        blockers = provider.blockers(vm, ExportOptions(), converts=False)
    finally:
        gcp.standin.state.denied = set()
    assert [b.code for b in blockers] == ["permission_denied"], blockers
    assert "compute.disks.useReadOnly" in blockers[0].message
    assert provider.blockers(vm, ExportOptions(), converts=False) == []
    assert _leftovers(gcp, name) == []


def test_a_retry_after_a_busy_range_reuses_the_image_the_export_and_the_ranges_read(
        gcp: GCP, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A range of the exported object stays busy past its retries and a budget of 0 s: the
    export fails transiently and keeps its image, its exported object and the ranges it
    read. The same job again makes no image, starts no build, and reads only the rest."""
    name = unique("t-gcp-resume")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[1])])
    job = unique("resume-job")
    # the object is ~10 MiB: parts of 2 MiB, the one at 4 MiB busy
    reading = {"chunk_size": 2 * MIB, "part_concurrency": 1}
    impatient = Config.model_validate({"export": {"throttle_budget": 0, "part_retries": 1,
                                                  **reading}})
    builds_before = len(gcp.standin.builds())
    gcp.faults.fail[4 * MIB] = 2
    caplog.set_level("INFO")
    try:
        with pytest.raises(Transient):
            GCPProvider(GCPProviderConfig.model_validate(gcp.section()),
                        settings=impatient).export(
                f"us-central1-a/{name}", tmp_path / "out", method="disks",
                options=ExportOptions(), job=job)
    finally:
        gcp.faults.fail.clear()
    assert len(_leftovers(gcp, name)) == 2  # the image and its exported object, kept
    result = GCPProvider(GCPProviderConfig.model_validate(gcp.section()),
                         settings=Config.model_validate({"export": reading})).export(
        f"us-central1-a/{name}", tmp_path / "out", method="disks", options=ExportOptions(),
        job=job)
    disk = next(f.path for f in result.files if f.role == "disk")
    assert qemu_img.compare(images[1], disk)
    assert "the images an earlier attempt made are used again" in caplog.text
    assert "the export object an earlier attempt made is used again" in caplog.text
    assert f"resuming after the {4 * MIB} bytes" in caplog.text
    assert len(gcp.standin.builds()) - builds_before == 1  # one build, by the first attempt
    assert caplog.text.count(" created") == 1, caplog.text  # one image, made once
    assert _leftovers(gcp, name) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [disk.name]


def test_the_export_tool_is_pulled_from_its_region_and_from_gcr_where_it_has_none(
        gcp: GCP, tmp_path: Path) -> None:
    """gcloud runs the export tool's regional builder from Artifact Registry where it is
    published, else the gcr.io one: a build of a builder the region lacks would fail to
    pull (as Cloud Build's does)."""
    name = unique("t-gcp-tool")
    images = _images(tmp_path, name)
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, images[1])])
    regions = set(gcp.standin.state.builder_regions)
    steps: list[str] = []
    try:
        for published in (regions, set()):
            gcp.standin.state.builder_regions = published
            before = len(gcp.standin.builds())
            result = _provider(gcp).export(f"us-central1-a/{name}", tmp_path / f"out{len(steps)}",
                                           method="disks", options=ExportOptions(),
                                           job=unique("tool-job"))
            assert qemu_img.compare(images[1], next(f.path for f in result.files))
            steps += [b["steps"][0]["name"] for b in gcp.standin.builds()[before:]]
    finally:
        gcp.standin.state.builder_regions = regions
    assert steps == [
        "us-central1-docker.pkg.dev/compute-image-import/wrappers/gce_vm_image_export:release",
        "gcr.io/compute-image-tools/gce_vm_image_export:release"], steps


def test_a_missing_role_of_the_export_tools_service_accounts_is_a_blocker(gcp: GCP) -> None:
    """The tool runs as the Cloud Build service account and starts its worker as the
    Compute one: a role gcloud would grant first and that is missing is a blocker naming
    the account, the role and the command; a policy the caller may not read is not."""
    name = unique("t-gcp-roles")
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, None)])
    provider = _provider(gcp)
    vm = provider.get_vm(f"us-central1-a/{name}")
    state = gcp.standin.state
    build_account = f"serviceAccount:{state.number}@cloudbuild.gserviceaccount.com"
    assert provider.blockers(vm, ExportOptions(), converts=False) == []
    state.bindings["roles/compute.admin"].discard(build_account)
    try:
        blockers = provider.blockers(vm, ExportOptions(), converts=False)
        assert [b.code for b in blockers] == ["service_account_roles_missing"], blockers
        assert f"{state.number}@cloudbuild.gserviceaccount.com" in blockers[0].message
        assert f"--member={build_account} --role=roles/compute.admin" in blockers[0].message
        state.denied.add("resourcemanager.projects.getIamPolicy")
        assert provider.blockers(vm, ExportOptions(), converts=False) == []
    finally:
        state.bindings["roles/compute.admin"].add(build_account)
        state.denied.discard("resourcemanager.projects.getIamPolicy")


def test_a_disk_encrypted_with_a_customer_supplied_key_is_a_blocker(
        gcp: GCP, tmp_path: Path) -> None:
    """Compute images a CSEK disk only when handed its key (the stand-in refuses as the
    API does): the dry run names the disk and the way out, and nothing is made."""
    name = unique("t-gcp-csek")
    gcp.standin.add_instance("us-central1-a", name, disks=[(1, None), (1, None)], csek=(1,))
    provider = _provider(gcp)
    vm = provider.get_vm(f"us-central1-a/{name}")
    blockers = provider.blockers(vm, ExportOptions(), converts=False)
    assert [b.code for b in blockers] == ["disk_encrypted_csek"], blockers
    assert f"{name}-disk1" in blockers[0].message and "customer-supplied" in blockers[0].message
    with pytest.raises(ProviderError, match="customer-supplied encryption key"):
        provider.export(f"us-central1-a/{name}", tmp_path / "out", method="disks",
                        options=ExportOptions(), job=unique("csek-job"))
    assert _leftovers(gcp, name) == []
