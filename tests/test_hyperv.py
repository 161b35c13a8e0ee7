"""The Hyper-V provider against the WinRM stand-in (tests/hyperv_standin.py, driven by the
real pywinrm client over HTTPS with NTLM) and a real Samba server holding real VHDX files
(qemu-img made, one dynamic, one fixed): inventory through the REST API, a VM name with
quotes and semicolons, a migration end to end, a running checkpointed VM exported and its
chain merged on the host, a cut SMB connection resumed, a cancel mid-copy, refused
credentials and a missing VM."""

from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from core.config import Config, HyperVProviderConfig
from core.errors import AuthFailed, InvalidRequest, NotFound, ProviderError, Transient
from core.models import ExportOptions, VMFilter
from hyper2kvm import qemu_img
from hyper2kvm.sample import make_disk
from providers.hyperv import HyperVProvider
from tests.helpers import (
    domain_facts,
    domain_firmware,
    domain_secure_boot,
    make_random_raw,
    start_and_stop,
)
from tests.hyperv_sim import HyperV
from tests.peers import EXPORTS, Daemon, free_port, unique, wait_for_job, wait_until
from tests.test_jobs import submit

ATTACK = "x'; Remove-VM * ;'"


def _vhdx(raw: Path, subformat: str) -> Path:
    target = raw.with_suffix(f".{subformat}.vhdx")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o",
                    f"subformat={subformat}", str(raw), str(target)], check=True)
    return target


def _guest(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A bootable GPT + ext4 disk as a dynamic VHDX, and a data disk as a fixed one."""
    boot = tmp_path / f"{name}-boot.raw"
    make_disk(boot, size_mib=24, hostname=name)
    data = make_random_raw(tmp_path, f"{name}-data", 8)
    return _vhdx(boot, "dynamic"), _vhdx(data, "fixed")


def _provider(hyperv: HyperV, **overrides: object) -> HyperVProvider:
    return HyperVProvider(HyperVProviderConfig.model_validate(hyperv.section(**overrides)),
                          settings=Config())


def test_inventory_through_the_api(api: httpx.Client, hyperv: HyperV, tmp_path: Path) -> None:
    env = unique("env")
    boot, data = _guest(tmp_path, "inv")
    web = hyperv.host.add_vm(unique("web"), [boot, data], state="Running", cpus=4,
                             memory_mb=4096, secure_boot=True,
                             notes=f"owner: team a\nenv={env}\ntier=web",
                             macs=("00:15:5d:0a:0b:0c", "00:15:5d:0a:0b:0d"))
    old = hyperv.host.add_vm(unique("old"), [boot], generation=1, notes=f"env={env}",
                             macs=("00:15:5d:00:00:01",), on_share=False)
    caps = api.get("/capabilities").json()["providers"]["hyperv"]
    assert caps["configured"] and caps["usable"], caps

    def listed(**flt: object) -> list[str]:
        answer = api.post("/vms/list", json={"provider": "hyperv", "filter": flt})
        assert answer.status_code == 200, answer.text
        return sorted(v["name"] for v in answer.json()["vms"])

    assert listed(tags=[f"env={env}"]) == sorted([web.name, old.name])
    assert listed(tags=[f"env={env}"], status="poweredOn") == [web.name]
    assert listed(tags=[f"env={env}", "tier=web"]) == [web.name]
    assert listed(tags=[f"env={env}"], name_pattern="old*") == [old.name]

    info = api.get("/vms/info", params={"provider": "hyperv", "identifier": web.id}).json()
    assert info["name"] == web.name and info["power_state"] == "poweredOn"
    assert info["cpus"] == 4 and info["memory_mb"] == 4096
    assert info["firmware"] == "efi" and info["secure_boot"] is True
    assert [d["capacity_bytes"] for d in info["disks"]] == [24 << 20, 8 << 20]
    assert [d["controller"] for d in info["disks"]] == ["scsi", "scsi"]
    assert [n["mac"] for n in info["nics"]] == ["00:15:5d:0a:0b:0c", "00:15:5d:0a:0b:0d"]
    assert info["nics"][0]["network"] == "External" and info["cdroms"] == 1
    by_name = api.get("/vms/info", params={"provider": "hyperv", "identifier": old.name}).json()
    assert by_name["identifier"] == old.id and by_name["firmware"] == "bios"
    assert by_name["secure_boot"] is False and by_name["disks"][0]["controller"] == "ide"
    missing = api.get("/vms/info", params={"provider": "hyperv", "identifier": "nobody"})
    assert missing.status_code == 404 and "nobody" in missing.json()["message"]


def test_a_name_with_quotes_and_semicolons_is_only_a_name(hyperv: HyperV,
                                                          tmp_path: Path) -> None:
    boot, _ = _guest(tmp_path, "q")
    bystander = hyperv.host.add_vm(unique("bystander"), [boot])
    victim = hyperv.host.add_vm(ATTACK, [boot], notes="tier=attack")
    provider = _provider(hyperv)
    found = provider.get_vm(ATTACK)
    assert found.identifier == victim.id and found.name == ATTACK
    assert bystander.id in hyperv.host.vms and victim.id in hyperv.host.vms
    assert not [a for a in hyperv.host.actions if a.startswith("Remove-VM")]
    sent = [s for s in hyperv.host.scripts if "Where-Object" in s and "Remove-VM" in s]
    assert sent and "-Value 'x''; Remove-VM * ;'''" in sent[-1]
    assert [vm.name for vm in provider.list_vms(VMFilter(tags=["tier=attack"]))] == [ATTACK]
    del hyperv.host.vms[victim.id]


def test_migration_ends_with_matching_domain_and_nothing_left(
        api: httpx.Client, daemon: Daemon, hyperv: HyperV, tmp_path: Path) -> None:
    name = unique("t-hv")
    boot, data = _guest(tmp_path, name)
    vm = hyperv.host.add_vm(name, [boot, data], cpus=2, memory_mb=1024, secure_boot=True,
                            macs=("00:15:5d:aa:00:01",))
    job_id = submit(api, vm_identifier=vm.id, provider="hyperv",
                    hyper2kvm_integration={"replace_existing": True})
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    disks = [Path(d["path"]) for d in info["result"]["disks"]]
    assert qemu_img.compare(boot, disks[0]), "the domain's boot disk differs from the VHDX"
    assert qemu_img.compare(data, disks[1]), "the domain's data disk differs from the VHDX"
    facts = domain_facts(name)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 1024 * 1024
    assert facts["macs"] == ["00:15:5d:aa:00:01"]
    assert domain_firmware(name) == "efi" and domain_secure_boot(name)
    assert start_and_stop(name)
    # powered off and on the share: read in place, nothing exported or converted first
    assert not [a for a in hyperv.host.actions if name in a]
    assert hyperv.staging() == []


def test_running_checkpointed_vm_is_exported_and_merged_on_the_host(
        hyperv: HyperV, tmp_path: Path) -> None:
    name = unique("t-hv-ckpt")
    base, _ = _guest(tmp_path, name)
    now = _vhdx(make_random_raw(tmp_path, f"{name}-now", 24), "dynamic")
    vm = hyperv.host.add_vm(name, [base], state="Running", checkpoint_states=[now])
    states: list[str] = []
    result = _provider(hyperv).export(
        vm.id, tmp_path / "out", method="disks", job="ckpt-job",
        progress=lambda _n: states.append(hyperv.host.vms[vm.id].state),
        options=ExportOptions())
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.suffix == ".vhdx" and qemu_img.compare(now, disk), "not the current state"
    assert not qemu_img.compare(base, disk)
    assert set(states) == {"Running"}  # Export-VM works on a running VM: never stopped
    actions = [a for a in hyperv.host.actions if name in a or "ckpt-job" in a]
    assert actions[0].startswith(f"Export-VM {name}") and "Convert-VHD" in actions[1]
    assert hyperv.staging() == []  # removed over SMB, not by the host
    assert not [a for a in actions if a.startswith("Remove-Item")]
    assert result.vm.snapshots == ["before-upgrade"]


def test_shutdown_and_restore_power_around_an_export(hyperv: HyperV, tmp_path: Path) -> None:
    name = unique("t-hv-run")
    boot, _ = _guest(tmp_path, name)
    vm = hyperv.host.add_vm(name, [boot], state="Running")
    states: list[str] = []
    result = _provider(hyperv).export(
        vm.id, tmp_path / "out", method="ova", job="power-job",
        progress=lambda _n: states.append(hyperv.host.vms[vm.id].state),
        options=ExportOptions(shutdown_vm=True, restore_power_state=True))
    assert set(states) == {"Off"}  # read in place, so only while it was off
    assert hyperv.host.vms[vm.id].state == "Running"
    assert [a for a in hyperv.host.actions if name in a] == [f"Stop-VM {name}",
                                                             f"Start-VM {name}"]
    assert [f.role for f in result.files] == ["ova"]


def test_a_cut_connection_resumes_from_the_part_it_cut(hyperv: HyperV, tmp_path: Path) -> None:
    name = unique("t-hv-cut")
    data = _vhdx(make_random_raw(tmp_path, name, 64), "fixed")
    vm = hyperv.host.add_vm(name, [data])
    hyperv.throttle.cut_after = 20 << 20
    try:
        result = _provider(hyperv).export(vm.id, tmp_path / "out", method="disks",
                                          options=ExportOptions(), job="cut-job")
    finally:
        hyperv.throttle.cut_after = None
    assert hyperv.throttle.cuts >= 1
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.read_bytes() == data.read_bytes()
    assert next(f.sha256 for f in result.files) == hashlib.sha256(data.read_bytes()).hexdigest()


def test_cancel_mid_copy_leaves_nothing(api: httpx.Client, daemon: Daemon, hyperv: HyperV,
                                        tmp_path: Path) -> None:
    name = unique("t-hv-cancel")
    data = _vhdx(make_random_raw(tmp_path, name, 96), "fixed")
    vm = hyperv.host.add_vm(name, [data])
    hyperv.throttle.rate = 4 << 20
    try:
        job_id = submit(api, vm_identifier=vm.id, provider="hyperv",
                        options={"transport": "export"})

        def copying() -> bool:  # the disk is being written under its partial name
            return any(EXPORTS.rglob(f".{name}-disk1.vhdx.partial"))

        wait_until(copying, timeout=120, what="the copy to start")
        started = time.monotonic()

        def well_into_the_copy() -> bool:  # 4 MiB of 96 (24 s at this rate)
            return any(p.stat().st_size >= 4 << 20
                       for p in EXPORTS.rglob(f".{name}-disk1.vhdx.partial"))

        wait_until(well_into_the_copy, timeout=60, interval=0.1, what="4 MiB copied")
        assert api.get("/jobs/query", params={"job_id": job_id}).json()["status"] == "running"
        assert hyperv.staging(), "Export-VM wrote nothing to the staging folder"
        assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
        assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    finally:
        hyperv.throttle.rate = 0
    wait_until(lambda: not hyperv.staging(), timeout=60,
               what="the staging folder to be removed")
    # past the time the whole copy takes: a reader left running would have finished by now
    time.sleep(max(0.0, started + 30 - time.monotonic()))
    assert not [p for p in EXPORTS.rglob(f"*{name}*") if p.is_file()]


def test_refused_credentials_missing_vm_and_unreachable_host(hyperv: HyperV) -> None:
    refused = hyperv.standin.state.refused
    with pytest.raises(AuthFailed, match="refused the credentials"):
        _provider(hyperv, password="wrong").list_vms(VMFilter())
    assert hyperv.standin.state.refused > refused
    with pytest.raises(AuthFailed, match="share"):
        _provider(hyperv, share_password="wrong").check()
    with pytest.raises(NotFound, match="no VM 'nobody-has-this-name'"):
        _provider(hyperv).get_vm("nobody-has-this-name")
    with pytest.raises(Transient, match="unreachable"):
        _provider(hyperv, host=f"127.0.0.1:{free_port()}").list_vms(VMFilter())
    provider = _provider(hyperv, transport="basic")
    assert provider.list_vms(VMFilter()) is not None
    assert "Hv-winrm-pw1" not in repr(provider.config)


def test_a_pass_through_disk_is_listed_a_dry_run_blocker_and_refused_by_the_export(
        api: httpx.Client, hyperv: HyperV, tmp_path: Path) -> None:
    """A pass-through drive's Path names a physical disk ("Disk 4 500.00 GB Bus 0 ..."),
    which Get-VHD does not know: get_vm still answers, listing it; the dry run names the
    blocker; an export refuses it before anything starts."""
    boot, _data = _guest(tmp_path, "pt")
    name = unique("passthrough")
    vm = hyperv.host.add_vm(name, [boot])
    vm.passthrough.append((4, 500))
    info = api.get("/vms/info", params={"provider": "hyperv", "identifier": name}).json()
    assert [(d["format"], d["capacity_bytes"]) for d in info["disks"]] == [
        ("vhdx", 24 << 20), ("passthrough", 500 << 30)], info["disks"]
    dry = api.post("/jobs/submit", json={"vm_identifier": name, "provider": "hyperv",
                                         "dry_run": True}).json()
    assert [b["code"] for b in dry["blockers"]] == ["passthrough_disk"], dry
    assert "Disk 4 500.00 GB" in dry["blockers"][0]["message"]
    with pytest.raises(InvalidRequest, match="pass-through"):
        _provider(hyperv).export(name, tmp_path / "out", method="disks",
                                 options=ExportOptions(), job="pt-job")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_long_export_vm_does_not_hold_up_other_calls_to_the_host(
        hyperv: HyperV, tmp_path: Path) -> None:
    """Export-VM runs for as long as the copy takes; meanwhile the same provider still
    lists VMs (each call has its own WinRM connection, up to a few at once)."""
    name = unique("t-hv-long")
    base, _ = _guest(tmp_path, name)
    vm = hyperv.host.add_vm(name, [base], state="Running",
                            checkpoint_states=[base])  # checkpointed: Export-VM
    provider = _provider(hyperv)
    hyperv.host.export_gate.clear()
    calls = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    try:
        future = calls.submit(provider.export, vm.id, tmp_path / "out", method="disks",
                              job="long-job", options=ExportOptions())
        wait_until(lambda: any("Export-VM" in script for script in hyperv.host.scripts),
                   timeout=60, what="Export-VM to start")
        listed = calls.submit(provider.list_vms, VMFilter(name_pattern=name)).result(
            timeout=60)  # one connection for everything would wait for the export
        assert not future.done() and not hyperv.host.export_gate.is_set()
        assert [v.name for v in listed] == [name]  # answered while Export-VM still ran
    finally:
        hyperv.host.export_gate.set()
        calls.shutdown(wait=True)
    assert [f.role for f in future.result().files] == ["disk"]


def test_staging_on_a_file_server_is_removed_over_smb_not_by_the_host(
        hyperv: HyperV, tmp_path: Path) -> None:
    """The share on another server (share_path left to its UNC): the host writes there as
    its computer account, but its WinRM session cannot remove anything there (the double
    hop, as the stand-in refuses Remove-Item of a UNC path); the provider removes the
    staging folder over its own SMB connection."""
    name = unique("t-hv-unc")
    base, _ = _guest(tmp_path, name)
    vm = hyperv.host.add_vm(name, [base], state="Running", checkpoint_states=[base])
    result = _provider(hyperv, share_path=None).export(
        vm.id, tmp_path / "out", method="disks", job="unc-job", options=ExportOptions())
    assert [f.role for f in result.files] == ["disk"]
    exported = [a for a in hyperv.host.actions if "unc-job" in a]
    assert exported[0].startswith("Export-VM") and "\\\\127.0.0.1\\" in exported[0]
    assert hyperv.staging() == []


def test_a_vm_with_more_disks_than_one_command_line_holds_is_described(
        hyperv: HyperV, tmp_path: Path) -> None:
    """WinRM's cmd shell runs each command through cmd.exe: 8,191 characters at most (the
    stand-in refuses longer ones, as cmd.exe does). Forty disks' paths do not fit in one
    Get-VHD; they are asked for in batches that do."""
    disk = _vhdx(make_random_raw(tmp_path, "many", 1), "dynamic")
    vm = hyperv.host.add_vm(unique("t-hv-many"), [disk] * 40)
    described = _provider(hyperv).get_vm(vm.id)
    assert len(described.disks) == 40
    assert [d.unit for d in described.disks] == list(range(40))
    batches = [s for s in hyperv.host.scripts if "Get-VHD" in s and vm.id in s]
    assert len(batches) > 1, "one Get-VHD of every path would not have run"


def test_a_file_server_share_the_host_may_not_write_is_a_blocker(
        hyperv: HyperV, tmp_path: Path) -> None:
    """Export-VM writes a file server's share as the host's computer account: a share
    whose ACL does not let HOST$ write would fail the export after the VM was stopped.
    Validation proves it with a probe VHDX made by New-VHD (the same services, the same
    account), removed again over SMB; a denied probe is a blocker saying what to grant."""
    name = unique("t-hv-acl")
    base, _ = _guest(tmp_path, name)
    vm = hyperv.host.add_vm(name, [base], state="Running", checkpoint_states=[base])
    provider = _provider(hyperv, share_path=None)
    described = provider.get_vm(vm.id)
    assert provider.blockers(described, ExportOptions(), converts=False) == []
    assert [a for a in hyperv.host.actions if a.startswith("New-VHD")], "no probe was made"
    hyperv.host.computer_account_may_write = False
    try:
        blockers = provider.blockers(described, ExportOptions(), converts=False)
        assert [b.code for b in blockers] == ["share_not_writable_by_host"], blockers
        assert "HOST$" in blockers[0].message and "\\\\127.0.0.1\\" in blockers[0].message
        with pytest.raises(ProviderError, match="access denied"):
            provider.export(vm.id, tmp_path / "out", method="disks", job=unique("acl-job"),
                            options=ExportOptions())
    finally:
        hyperv.host.computer_account_may_write = True
    assert not list(hyperv.host.share_dir.glob(".hypersdk-probe-*")), "a probe was left"
    assert hyperv.staging() == []
