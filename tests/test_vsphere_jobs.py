"""vSphere through hypervisord: the REST inventory and a migrate-vm job from the vCenter
simulator to a libvirt domain, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pyVim.task import WaitForTask

from hyper2kvm import qemu_img
from hyper2kvm.sample import make_disk
from tests.helpers import domain_facts, start_and_stop
from tests.peers import Daemon, unique, wait_for_job
from tests.test_jobs import submit
from tests.vsphere_sim import Vcsim, create_vm, give_disk_content


def test_inventory_through_the_api(api: httpx.Client, vcsim: Vcsim, si: Any) -> None:
    name = unique("t-api")
    vm = create_vm(si, name, disks_mib=[4], cpus=2, memory_mb=512,
                   macs=("00:50:56:0a:0b:0c",))
    listed = api.post("/vms/list", json={"provider": "vsphere",
                                         "filter": {"name_pattern": f"{name}*"}})
    assert listed.status_code == 200, listed.text
    assert [v["identifier"] for v in listed.json()["vms"]] == [vm._moId]
    info = api.get("/vms/info", params={"provider": "vsphere", "identifier": vm._moId}).json()
    assert (info["name"], info["cpus"], info["memory_mb"]) == (name, 2, 512)
    assert info["nics"][0]["mac"] == "00:50:56:0a:0b:0c"
    missing = api.get("/vms/info", params={"provider": "vsphere", "identifier": "vm-nope"})
    assert missing.status_code == 404 and "no VM" in missing.json()["message"]


def test_vsphere_vm_migrates_to_a_matching_domain(
        api: httpx.Client, daemon: Daemon, vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    name = unique("t-vs")
    images = [tmp_path / "boot.raw", tmp_path / "data.raw"]
    make_disk(images[0], size_mib=24, hostname=name)  # GPT + ext4, a real guest disk
    images[1].write_bytes((b"data disk " * ((4 << 20) // 10 + 1))[:4 << 20])
    vm = create_vm(si, name, disks_mib=[24, 4], cpus=2, memory_mb=256,
                   macs=("00:50:56:aa:00:01", "00:50:56:aa:00:02"))
    give_disk_content(vcsim, vm, images, layout="stream")
    # the defaults a fresh config has: guest conversion "auto", the boot check "warn"
    job_id = submit(api, vm_identifier=vm._moId, provider="vsphere", export_method="ova",
                    hyper2kvm_integration={"replace_existing": True, "convert_guest": "auto",
                                           "verify_boot": "warn"})
    info = wait_for_job(api, job_id, timeout=420)
    assert info["status"] == "completed", info["error"]
    result = info["result"]
    # data disks: no OS to convert, so the disks stay as copied, and no wait for a login
    # that cannot come (vcsim's VMs are UEFI)
    assert result["guest"]["converted"] is False, result["guest"]
    assert result["boot"]["watched"] is False and result["boot"]["seconds"] == 0
    assert "no operating system" in result["boot"]["reason"], result["boot"]
    assert result["domain_name"] == name
    disks = [Path(d["path"]) for d in result["disks"]]
    assert len(disks) == 2
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the VM's disk"
    facts = domain_facts(name)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 256 * 1024
    assert facts["macs"] == ["00:50:56:aa:00:01", "00:50:56:aa:00:02"]
    assert facts["disks"] == [str(d) for d in disks]
    assert start_and_stop(name), "the migrated domain does not start"
    # a migration keeps no OVA: the NFC streams went straight into the images
    assert result["export"]["streamed"] is True and result["export"]["files"] == []


def test_running_vm_without_shutdown_fails_the_job_clearly(
        api: httpx.Client, vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    name = unique("t-run")
    vm = create_vm(si, name, disks_mib=[4])
    WaitForTask(vm.PowerOnVM_Task())
    dry = api.post("/jobs/submit", json={"vm_identifier": vm._moId, "provider": "vsphere",
                                         "dry_run": True}).json()
    assert [b["code"] for b in dry["blockers"]] == ["vm_powered_on"], dry
    job_id = submit(api, vm_identifier=vm._moId, provider="vsphere", export_method="vmdk")
    info = wait_for_job(api, job_id, timeout=120)
    assert info["status"] == "failed"
    assert "poweredOn" in info["error"] and "shutdown_vm" in info["error"]
    logs = "\n".join(line["message"] for line in
                     api.get(f"/jobs/logs/{job_id}").json()["logs"])
    assert "Task run 'export" not in logs  # it stopped in validate, before the export
