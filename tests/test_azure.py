"""The Azure provider: its control plane against the ARM stand-in
(tests/azure_arm_standin.py) driven by the real azure-mgmt-compute/-network clients and
azure-identity, its bytes from Azurite through azure-storage-blob. Inventory through the
REST API, a migration end to end, a range that fails then succeeds, a cancel mid-download,
refused credentials, a missing VM, a running VM deallocated and started again."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from core.config import AzureProviderConfig, Config
from core.errors import AuthFailed, NotFound, ProviderError, Transient
from core.models import ExportOptions, VMFilter
from hyper2kvm import qemu_img
from hyper2kvm.sample import make_disk
from providers.azure import AzureProvider
from tests.azure_arm_standin import CLIENT_ID, TENANT
from tests.azure_sim import Azure
from tests.helpers import domain_facts, domain_firmware, start_and_stop
from tests.peers import EXPORTS, Daemon, free_port, unique, wait_for_job, wait_until
from tests.test_jobs import submit

MIB = 1 << 20


def _images(tmp_path: Path, name: str) -> list[Path]:
    boot, data = tmp_path / "boot.raw", tmp_path / "data.raw"
    make_disk(boot, size_mib=24, hostname=name)
    with data.open("wb") as out:
        out.write(b"azure data " * (1 << 20))
        out.seek(20 * MIB)
        out.write(b"tail" * (1 << 18))
    return [boot, data]


def _provider(azure: Azure, *, settings: Config | None = None,
              **overrides: object) -> AzureProvider:
    section = {"subscription_id": azure.subscription, "tenant_id": TENANT,
               "client_id": CLIENT_ID, "client_secret": azure.secret,
               "arm_endpoint": azure.standin.url, "authority": azure.standin.url,
               "ca_file": str(azure.standin.ca), **overrides}
    return AzureProvider(AzureProviderConfig.model_validate(section),
                         settings=settings or Config())


def test_inventory_through_the_api(api: httpx.Client, azure: Azure) -> None:
    group = unique("rg")
    azure.standin.add_vm(group, "web", disks=[(64 * MIB, None), (32 * MIB, None)],
                         generation="V2", secure_boot=True, running=True,
                         tags={"env": group}, macs=("00-0D-3A-0A-0B-0C", "00-0D-3A-0A-0B-0D"))
    azure.standin.add_vm(group, "db", size="Standard_B1s", disks=[(64 * MIB, None)],
                         tags={"env": group, "tier": "data"})
    caps = api.get("/capabilities").json()["providers"]["azure"]
    assert caps["configured"] and caps["usable"], caps

    def listed(**flt: object) -> list[str]:
        answer = api.post("/vms/list", json={"provider": "azure", "filter": flt})
        assert answer.status_code == 200, answer.text
        return sorted(v["identifier"] for v in answer.json()["vms"])

    assert listed(folder=group) == [f"{group}/db", f"{group}/web"]
    assert listed(folder=group, status="poweredOn") == [f"{group}/web"]
    assert listed(folder=group, status="poweredOff") == [f"{group}/db"]
    assert listed(tags=[f"env={group}", "tier=data"]) == [f"{group}/db"]
    assert listed(folder=group, name_pattern="w*") == [f"{group}/web"]
    assert listed(folder=group, datacenter="eastus") == []

    info = api.get("/vms/info", params={"provider": "azure",
                                        "identifier": f"{group}/web"}).json()
    assert info["cpus"] == 2 and info["memory_mb"] == 8192  # Standard_D2s_v3
    assert info["firmware"] == "efi" and info["secure_boot"] is True
    assert info["guest_os"] == "linux" and info["power_state"] == "poweredOn"
    assert [d["name"] for d in info["disks"]] == ["web-disk0", "web-disk1"]
    assert [d["capacity_bytes"] for d in info["disks"]] == [64 * MIB, 32 * MIB]
    assert [n["mac"] for n in info["nics"]] == ["00:0d:3a:0a:0b:0c", "00:0d:3a:0a:0b:0d"]
    assert info["nics"][0]["ip_address"] == "10.0.0.4" and info["nics"][0]["network"] == "default"
    db = api.get("/vms/info", params={"provider": "azure", "identifier": f"{group}/db"}).json()
    assert db["cpus"] == 1 and db["firmware"] == "bios"

    missing = api.get("/vms/info", params={"provider": "azure",
                                           "identifier": f"{group}/nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["message"]


def test_migration_ends_with_matching_domain_and_no_snapshots(
        api: httpx.Client, daemon: Daemon, azure: Azure, tmp_path: Path) -> None:
    group, name = unique("rg"), unique("t-az")
    images = _images(tmp_path, name)
    azure.standin.add_vm(group, name, size="Standard_B1s", generation="V2", running=True,
                         disks=[(64 * MIB, images[0]), (32 * MIB, images[1])],
                         macs=("00-0D-3A-AA-00-01",))
    # the first range read at offset 0 fails twice before it is served: retried on its own
    azure.faults.fail[0] = 2
    job_id = submit(api, vm_identifier=f"{group}/{name}", provider="azure",
                    hyper2kvm_integration={"replace_existing": True})
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    assert azure.faults.fail[0] == 0, "the failing range was never asked for"
    result = info["result"]
    disks = [Path(d["path"]) for d in result["disks"]]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the managed disk"
    facts = domain_facts(name)
    assert facts["vcpus"] == 1 and facts["memory_kib"] == 1024 * 1024  # Standard_B1s
    assert facts["macs"] == ["00:0d:3a:aa:00:01"]
    assert domain_firmware(name) == "efi"
    assert start_and_stop(name)
    assert result["export"]["method"] == "disks"
    assert all(len(f["sha256"]) == 64 for f in result["export"]["files"])
    logs = "\n".join(line["message"] for line in
                     api.get(f"/jobs/logs/{job_id}").json()["logs"])
    assert "range reads retried" in logs and "snapshot" in logs
    assert [s for s in azure.standin.snapshots() if name in s["name"]] == []


def test_cancel_mid_download_revokes_and_deletes_snapshots(
        api: httpx.Client, daemon: Daemon, azure: Azure, tmp_path: Path) -> None:
    group, name = unique("rg"), unique("t-az-cancel")
    images = _images(tmp_path, name)
    azure.standin.add_vm(group, name, disks=[(64 * MIB, images[0])])
    azure.faults.delay = 1.0
    try:
        job_id = submit(api, vm_identifier=f"{group}/{name}", provider="azure")

        def downloading() -> bool:
            snapshots = [s for s in azure.standin.snapshots() if name in s["name"]]
            return bool(snapshots) and snapshots[0]["_access"]

        wait_until(downloading, timeout=120, what="the download to start")
        assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
        assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    finally:
        azure.faults.delay = 0.0
    wait_until(lambda: not [s for s in azure.standin.snapshots() if name in s["name"]],
               timeout=60, what="the snapshot to be deleted")
    wait_until(lambda: not [p for p in EXPORTS.rglob(f"*{name}*") if p.is_file()],
               timeout=30, what="partial files removed")


def test_running_vm_deallocated_exported_and_started_again(
        azure: Azure, tmp_path: Path) -> None:
    group, name = unique("rg"), unique("t-az-run")
    images = _images(tmp_path, name)
    vm_id = azure.standin.add_vm(group, name, running=True,
                                 disks=[(64 * MIB, images[0]), (32 * MIB, images[1])])
    powers: list[str] = []
    provider = _provider(azure)
    moved: list[int] = []

    def progress(count: int) -> None:
        moved.append(count)
        if len(powers) < 1:
            powers.append(azure.standin.power(vm_id))

    result = provider.export(f"{group}/{name}", tmp_path / "out", method="vmdk",
                             options=ExportOptions(shutdown_vm=True, restore_power_state=True),
                             progress=progress, job="run-job")
    # deallocated while its disks were captured, started again as soon as they were
    assert azure.standin.powers_at_snapshot(name) == ["deallocated", "deallocated"]
    assert powers == ["running"]  # the reads came after the restart
    assert azure.standin.power(vm_id) == "running"
    assert sum(moved) == 96 * MIB  # each disk's every byte once, holes included
    disks = [f.path for f in result.files if f.role == "disk"]
    assert [p.suffix for p in disks] == [".vmdk", ".vmdk"]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk)
    assert [s for s in azure.standin.snapshots() if name in s["name"]] == []


def test_refused_credentials_missing_vm_and_unreachable_arm(azure: Azure) -> None:
    with pytest.raises(AuthFailed, match="invalid_client|Invalid client secret|refused"):
        _provider(azure, client_secret="not-the-secret").list_vms(VMFilter())
    with pytest.raises(NotFound, match="nope"):
        _provider(azure).get_vm(f"{unique('rg')}/nope")
    with pytest.raises(NotFound, match="no VM 'nobody-has-this-name'"):
        _provider(azure).get_vm("nobody-has-this-name")
    with pytest.raises(Transient, match="cannot reach Azure"):
        _provider(azure, arm_endpoint=f"https://127.0.0.1:{free_port()}").list_vms(VMFilter())
    assert azure.secret not in repr(_provider(azure).config)


def test_a_snapshot_still_copying_is_waited_for_before_access_is_granted(
        azure: Azure, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Snapshots of Premium SSD v2 and Ultra disks are not instant-access: until their
    background copy ends (completionPercent 100) Azure refuses to grant access."""
    group, name = unique("rg"), unique("t-az-v2")
    images = _images(tmp_path, name)
    azure.standin.add_vm(group, name, disks=[(64 * MIB, images[0])], sku="PremiumV2_LRS")
    caplog.set_level("INFO")
    result = _provider(azure).export(f"{group}/{name}", tmp_path / "out", method="disks",
                                     options=ExportOptions(), job="copying-job")
    disk = next(f.path for f in result.files if f.role == "disk")
    assert qemu_img.compare(images[0], disk)
    assert "background copy" in caplog.text and "% done" in caplog.text, caplog.text
    assert [s for s in azure.standin.snapshots() if name in s["name"]] == []


def test_page_ranges_of_a_large_fragmented_disk_are_listed_in_segments_and_merged(
        azure: Azure, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of small page ranges over a disk larger than a segment: one listing of
    the whole blob times out (as on Azure), a busy segment is tried again, and the ranges
    are read as a few large parts."""
    group, name = unique("rg"), unique("t-az-frag")
    image = tmp_path / "fragmented.raw"
    sector = b"\xa5" * 512
    with image.open("wb") as out:
        for base in (0, (1 << 30) + MIB):  # a fragmented MiB in the first and second GiB
            out.seek(base)
            out.write((sector + bytes(512)) * 1024)  # 1024 ranges of one sector each
    azure.standin.add_vm(group, name, disks=[((3 << 30) // 2, image)], fragmented=True)
    azure.faults.page_list_span, azure.faults.page_list_fail = 1 << 30, 1
    reads_before = azure.faults.reads
    azure.faults.page_lists.clear()
    caplog.set_level("INFO")
    try:
        result = _provider(azure).export(f"{group}/{name}", tmp_path / "out", method="disks",
                                         options=ExportOptions(), job="fragmented-job")
    finally:
        azure.faults.page_list_span, azure.faults.page_list_fail = None, 0
    disk = next(f.path for f in result.files if f.role == "disk")
    assert qemu_img.compare(image, disk)
    # two segments, the first asked twice (it was busy once). (azure-storage-blob's
    # downloader also lists a page blob's whole range, to skip its holes, and goes on
    # when that fails: refused here, as a timeout)
    assert azure.faults.page_lists == ["bytes=0-1073741823", "bytes=0-1073741823",
                                       "bytes=1073741824-1610612735"], azure.faults.page_lists
    assert "ServerBusy" in caplog.text
    # 2048 ranges read as two parts, plus the footer
    assert azure.faults.reads - reads_before == 3


def test_a_disk_encrypted_in_the_guest_is_a_dry_run_blocker(
        api: httpx.Client, azure: Azure, tmp_path: Path) -> None:
    group, name = unique("rg"), unique("t-az-ade")
    images = _images(tmp_path, name)
    azure.standin.add_vm(group, name, disks=[(64 * MIB, images[0])], disk_properties={
        "encryptionSettingsCollection": {"enabled": True, "encryptionSettings": []},
        "networkAccessPolicy": "DenyAll"})
    dry = api.post("/jobs/submit", json={"vm_identifier": f"{group}/{name}",
                                         "provider": "azure", "dry_run": True}).json()
    assert [b["code"] for b in dry["blockers"]] == [
        "disk_encrypted_in_guest", "disk_access_denied"], dry
    assert "Azure Disk Encryption" in dry["blockers"][0]["message"]
    assert [s for s in azure.standin.snapshots() if name in s["name"]] == []
    # a real job stops at the same blockers, before any snapshot is made
    job_id = submit(api, vm_identifier=f"{group}/{name}", provider="azure")
    info = wait_for_job(api, job_id)
    assert info["status"] == "failed" and "networkAccessPolicy DenyAll" in info["error"]
    assert [s for s in azure.standin.snapshots() if name in s["name"]] == []


def test_a_vm_on_a_retired_size_is_described_from_resource_skus(
        api: httpx.Client, azure: Azure) -> None:
    """Standard_A1 is closed to new VMs: the deprecated VM sizes list leaves it out, but
    VMs still run on it; Resource SKUs describe it (with its restriction)."""
    group, name = unique("rg"), unique("t-az-a1")
    azure.standin.add_vm(group, name, size="Standard_A1", disks=[(64 * MIB, None)])
    info = api.get("/vms/info", params={"provider": "azure",
                                        "identifier": f"{group}/{name}"})
    assert info.status_code == 200, info.text
    assert (info.json()["cpus"], info.json()["memory_mb"]) == (1, 1792)


def test_a_retry_after_a_busy_range_reuses_the_snapshot_and_the_ranges_read(
        azure: Azure, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A range stays busy past its retries and a budget of 0 s: the export fails
    transiently, keeps its snapshot (access revoked: Azure counts SAS per disk) and the
    ranges it read. The same job again makes no snapshot and reads only the rest."""
    group, name = unique("rg"), unique("t-az-resume")
    image = tmp_path / "random.raw"
    image.write_bytes(os.urandom(24 * MIB))  # parts of 10 MiB at 0, 10 and 20 MiB
    azure.standin.add_vm(group, name, disks=[(24 * MIB, image)])
    job = unique("resume-job")
    impatient = Config.model_validate({"export": {"throttle_budget": 0, "part_retries": 1,
                                                  "part_concurrency": 1}})
    azure.faults.fail[10 * MIB] = 2
    caplog.set_level("INFO")
    try:
        with pytest.raises(Transient):
            _provider(azure, settings=impatient).export(
                f"{group}/{name}", tmp_path / "out", method="disks", options=ExportOptions(),
                job=job)
    finally:
        azure.faults.fail.clear()
    kept = [s for s in azure.standin.snapshots() if s["tags"].get("hypersdk-job") == job]
    assert len(kept) == 1 and kept[0]["properties"]["diskState"] != "ActiveSAS", kept
    reads_before = azure.faults.reads
    result = _provider(azure).export(f"{group}/{name}", tmp_path / "out", method="disks",
                                     options=ExportOptions(), job=job)
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.read_bytes() == image.read_bytes()
    assert "the snapshots an earlier attempt made are used again" in caplog.text
    assert f"resuming after the {10 * MIB} bytes" in caplog.text
    assert azure.faults.reads - reads_before == 3  # the footer, and the ranges at 10 and 20 MiB
    assert caplog.text.count(" of disk ") == 1, caplog.text  # one snapshot, made once
    assert [s for s in azure.standin.snapshots() if s["tags"].get("hypersdk-job") == job] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [disk.name]


def test_a_disk_whose_five_snapshots_hold_a_sas_is_refused_naming_them(
        azure: Azure, tmp_path: Path) -> None:
    """Azure lets only 5 incremental snapshots of one disk hold a SAS at a time: a sixth
    grant is refused, and the error names the snapshots that hold one and what to do.
    The export's own snapshot is removed."""
    from providers.azure import export as azure_export  # the calls other tools would make

    group, name = unique("rg"), unique("t-az-sas")
    azure.standin.add_vm(group, name, disks=[(4 * MIB, None)])
    provider = _provider(azure)
    vm = provider.get_vm(f"{group}/{name}")
    disk_id = str(vm.disks[0].datastore)
    others = [azure_export.create_snapshot(provider.clients, disk_id, vm.datacenter or "",
                                           f"other{i}") for i in range(5)]
    try:
        for snapshot_id in others:
            azure_export.grant_read(provider.clients, snapshot_id)
        with pytest.raises(ProviderError, match="only 5 snapshots of one disk") as caught:
            provider.export(f"{group}/{name}", tmp_path / "out", method="disks",
                            options=ExportOptions(), job=unique("sas-job"))
        assert all(s.rsplit("/", 1)[-1] in str(caught.value) for s in others)
        assert "revoke-access" in str(caught.value)
        assert len([s for s in azure.standin.snapshots() if name in s["name"]]) == 5
    finally:
        for snapshot_id in others:
            azure_export.remove_snapshot(provider.clients, snapshot_id)


def test_an_action_the_role_excludes_is_a_blocker_found_with_the_permissions_api(
        azure: Azure, tmp_path: Path) -> None:
    """Microsoft.Authorization's permissions API answers which actions the caller's roles
    allow in a resource group: a role without snapshots/write is a permission_denied
    blocker naming the group and the action (the export itself is refused 403), found
    without making anything."""
    group, name = unique("rg"), unique("t-az-rbac")
    azure.standin.add_vm(group, name, disks=[(4 * MIB, None)])
    provider = _provider(azure)
    vm = provider.get_vm(f"{group}/{name}")
    assert provider.blockers(vm, ExportOptions(), converts=False) == []
    azure.standin.state.denied_actions.add("Microsoft.Compute/snapshots/write")
    try:
        blockers = provider.blockers(vm, ExportOptions(), converts=False)
        assert [b.code for b in blockers] == ["permission_denied"], blockers
        assert group in blockers[0].message
        assert "Microsoft.Compute/snapshots/write" in blockers[0].message
        assert [s for s in azure.standin.snapshots() if name in s["name"]] == []
        with pytest.raises(AuthFailed, match="AuthorizationFailed"):
            provider.export(f"{group}/{name}", tmp_path / "out", method="disks",
                            options=ExportOptions(), job=unique("rbac-job"))
    finally:
        azure.standin.state.denied_actions.clear()
