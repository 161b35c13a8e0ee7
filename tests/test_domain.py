"""Domain XML defined for real in libvirt (qemu:///system), BIOS and UEFI."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from core.errors import RegistrationError
from core.models import DiskInfo, NicInfo, VMInfo
from hyper2kvm import qemu_img
from hyper2kvm.domain import DomainDisk, NetworkMap, domain_xml
from hyper2kvm.registration import define_domain, undefine_domain
from tests.helpers import start_and_stop
from tests.peers import unique


def _vm(name: str, firmware: str, secure_boot: bool = False) -> VMInfo:
    return VMInfo(identifier=name, name=name, provider="local", cpus=3, memory_mb=768,
                  firmware=firmware, secure_boot=secure_boot,  # type: ignore[arg-type]
                  disks=[DiskInfo(name="a", capacity_bytes=2**20),
                         DiskInfo(name="b", capacity_bytes=2**20)],
                  nics=[NicInfo(mac="52:54:00:00:00:01", network="Prod"),
                        NicInfo(mac="52:54:00:00:00:02", network="Lab")])


def test_windows_guests_get_sata_and_e1000(libvirt_uri: str, tmp_path: Path) -> None:
    name = unique()
    vm = _vm(name, "efi").model_copy(update={"guest_os": "windows9_64Guest"})
    xml = domain_xml(vm, [DomainDisk(tmp_path / "a.qcow2", "qcow2")], domain_type="qemu",
                     networks=NetworkMap(default="user"))
    define_domain(libvirt_uri, xml, name=name, autostart=False, replace=False)
    try:
        conn = libvirt.open(libvirt_uri)
        defined = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
        conn.close()
        target = defined.find("devices/disk/target")
        assert (target.get("bus"), target.get("dev")) == ("sata", "sda")
        assert {m.get("type") for m in defined.findall("devices/interface/model")} == {"e1000"}
    finally:
        undefine_domain(libvirt_uri, name)
    linux = domain_xml(_vm(name, "bios"), [DomainDisk(tmp_path / "a.qcow2", "qcow2")])
    assert "bus=\"virtio\"" in linux and "e1000" not in linux


@pytest.mark.parametrize(("firmware", "secure_boot"), [("bios", False), ("efi", False),
                                                       ("efi", True)])
def test_domain_defines_in_libvirt(libvirt_uri: str, tmp_path: Path, firmware: str,
                                   secure_boot: bool) -> None:
    name = unique()
    disks = [DomainDisk(tmp_path / "a.qcow2", "qcow2"), DomainDisk(tmp_path / "b.raw", "raw")]
    xml = domain_xml(_vm(name, firmware, secure_boot), disks, domain_type="qemu",
                     networks=NetworkMap(default="user", by_source={}))
    registered = define_domain(libvirt_uri, xml, name=name, autostart=True, replace=False)
    try:
        conn = libvirt.open(libvirt_uri)
        domain = conn.lookupByName(name)
        defined = ET.fromstring(domain.XMLDesc(0))
        assert domain.UUIDString() == registered.uuid and registered.autostart
        assert domain.autostart() == 1
        assert defined.findtext("vcpu") == "3"
        assert int(defined.findtext("memory") or 0) == 768 * 1024
        assert [d.find("target").get("dev") for d in defined.findall("devices/disk")] == [
            "vda", "vdb"]
        assert [d.find("driver").get("type") for d in defined.findall("devices/disk")] == [
            "qcow2", "raw"]
        assert [m.get("address") for m in defined.findall("devices/interface/mac")] == [
            "52:54:00:00:00:01", "52:54:00:00:00:02"]
        assert defined.find("os/type").get("machine").startswith("pc-q35")
        if firmware == "efi":  # libvirt picks the OVMF build when the domain starts
            assert defined.find("os").get("firmware") == "efi"
            feature = defined.find("os/firmware/feature[@name='secure-boot']")
            assert feature.get("enabled") == ("yes" if secure_boot else "no")
            assert (defined.find("features/smm") is not None) is secure_boot
        else:
            assert defined.find("os").get("firmware") is None
        assert defined.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
        assert defined.find("devices/rng") is not None
        with pytest.raises(RegistrationError, match="already exists"):
            define_domain(libvirt_uri, xml, name=name, autostart=False, replace=False)
        again = define_domain(libvirt_uri, xml, name=name, autostart=False, replace=True)
        assert again.name == name and not again.autostart
        conn.close()
    finally:
        assert undefine_domain(libvirt_uri, name)


def test_uefi_secure_boot_domain_starts_with_ovmf_and_nvram(libvirt_uri: str) -> None:
    import subprocess

    from tests.peers import SESSION_DIR

    name = unique()
    disk = SESSION_DIR / f"{name}.qcow2"  # a folder qemu's own user can reach
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    xml = domain_xml(_vm(name, "efi", secure_boot=True).model_copy(update={"nics": []}),
                     [DomainDisk(disk, "qcow2")], domain_type="qemu")
    define_domain(libvirt_uri, xml, name=name, autostart=False, replace=False)
    conn = libvirt.open(libvirt_uri)
    try:
        domain = conn.lookupByName(name)
        domain.create()
        live = ET.fromstring(domain.XMLDesc(0))
        domain.destroy()
        loader = live.find("os/loader")
        assert loader is not None and "OVMF" in (loader.text or "")
        assert loader.get("secure") == "yes"
        assert live.find("os/nvram") is not None
    finally:
        conn.close()
        undefine_domain(libvirt_uri, name)


def test_a_pool_follows_its_vm_to_a_new_folder(libvirt_uri: str, tmp_path: Path) -> None:
    """Converting a VM again into another folder (the old one since deleted) must not fail
    on, or list the volumes of, the pool its first conversion made."""
    import shutil

    from hyper2kvm.registration import connect, place_in_pool

    name = f"hypersdk-{unique()}"
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        (folder / f"{folder.name}.qcow2").write_bytes(b"\0" * 512)
    assert place_in_pool(libvirt_uri, first, name) == (name, ["first.qcow2"])
    shutil.rmtree(first)
    assert place_in_pool(libvirt_uri, second, name) == (name, ["second.qcow2"])
    with connect(libvirt_uri) as conn:
        pool = conn.storagePoolLookupByName(name)
        assert ET.fromstring(pool.XMLDesc(0)).findtext("target/path") == str(second)
        assert pool.isActive() and pool.autostart()
    assert (second / "second.qcow2").is_file()  # nothing of the VM was deleted


def test_a_disk_qemu_cannot_reach_is_refused_naming_the_folder_and_the_fix(
        libvirt_uri: str, tmp_path: Path) -> None:
    """qemu runs as libvirt-qemu: a disk under a 0700 folder would be defined, then fail
    to start with 'Permission denied'; it is refused up front, the folder named."""
    from tests.helpers import start_and_stop

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    disk = private / "vm" / "disk.qcow2"
    disk.parent.mkdir()
    qemu_img.convert(qemu_img.DiskSource(make_zero_raw(tmp_path / "zero.raw"), "raw"), disk,
                     output_format="qcow2")
    name = unique()
    xml = domain_xml(_vm(name, "bios"), [DomainDisk(disk, "qcow2")], domain_type="qemu",
                     networks=NetworkMap(default="user"))
    with pytest.raises(RegistrationError, match=f"cannot pass through {private} "
                                                r"\(mode 0700\).*chmod o\+x"):
        define_domain(libvirt_uri, xml, name=name, autostart=False, replace=False)
    private.chmod(0o711)  # the fix the message gives: now the domain defines and starts
    define_domain(libvirt_uri, xml, name=name, autostart=False, replace=False)
    try:
        assert start_and_stop(name)
    finally:
        undefine_domain(libvirt_uri, name)


def test_hypervisord_check_says_when_qemu_cannot_reach_the_output_folder(
        tmp_path: Path) -> None:
    import subprocess

    from tests.peers import BIN

    private = tmp_path / "locked"
    private.mkdir(mode=0o700)
    config = tmp_path / "config.yaml"
    config.write_text(f"hyper2kvm:\n  output_dir: \"{private / 'images'}\"\n")
    (private / "images").mkdir()
    done = subprocess.run([str(BIN / "hypervisord"), "--check", "--config", str(config)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and f"cannot pass through {private}" in done.stdout
    private.chmod(0o711)
    again = subprocess.run([str(BIN / "hypervisord"), "--check", "--config", str(config)],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stdout
    assert "domains run as " in again.stdout and "guest conversion: virt-v2v-in-place" \
        in again.stdout, again.stdout


def make_zero_raw(path: Path) -> Path:
    path.write_bytes(bytes(2**20))
    return path


@pytest.mark.parametrize("domain_type", ["kvm", "qemu"])
def test_the_chosen_cpu_runs_a_kernel_on_this_host(libvirt_uri: str, domain_type: str) -> None:
    """With KVM (where libvirt has it) and with TCG, the chosen CPU starts a domain and
    boots the host's kernel to its first panic: guest code really runs."""
    from hyper2kvm.cpu import (
        CpuChoice,
        _refused_by_host,
        choose_cpu,
        kernel_boots,
        supported_modes,
    )

    if domain_type == "kvm" and "host-passthrough" not in _kvm_modes(libvirt_uri):
        pytest.skip("libvirt has no usable KVM on this machine")
    cpu = choose_cpu(libvirt_uri, domain_type)  # type: ignore[arg-type]
    if domain_type == "qemu":
        assert cpu.mode in ("maximum", "default")  # host-passthrough needs KVM
        assert kernel_boots(libvirt_uri, "qemu", cpu) is True
        return
    plain_refused = _refused_by_host(libvirt_uri, "kvm", CpuChoice("host-passthrough"))
    # features are turned off exactly where the plain host CPU is refused (nested AMD)
    assert bool(cpu.disabled) == (plain_refused is not None), (cpu, plain_refused)
    assert _refused_by_host(libvirt_uri, "kvm", cpu) is None
    assert "host-passthrough" in supported_modes(libvirt_uri, "kvm")


def _kvm_modes(uri: str) -> set[str]:
    from core.errors import RegistrationError
    from hyper2kvm.cpu import supported_modes

    try:
        return supported_modes(uri, "kvm")
    except RegistrationError:
        return set()


def test_domains_run_as_kvm_only_where_a_kernel_boots_under_it(
    libvirt_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto: KVM where the host's kernel boots under it (not merely where a domain
    starts: nested KVM may start one that never runs), TCG otherwise; the verdict is
    cached per host boot, and a domain defined with it starts."""
    import json

    from hyper2kvm.cpu import choose_cpu, domain_type_and_cpu, kernel_boots

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    choose_cpu.cache_clear()  # probe afresh into this empty cache
    domain_type, cpu = domain_type_and_cpu("auto", libvirt_uri)
    cached = json.loads((tmp_path / "hypersdk" / "domain-type.json").read_text())
    assert [verdict for key, verdict in cached.items() if key.startswith("type|")] == [
        domain_type]
    assert [choice for key, choice in cached.items() if key.startswith(f"cpu-{domain_type}|")
            ] == [[cpu.mode, list(cpu.disabled)]]
    if "host-passthrough" in _kvm_modes(libvirt_uri):
        kvm_runs = kernel_boots(libvirt_uri, "kvm", choose_cpu(libvirt_uri, "kvm"))
        assert domain_type == ("kvm" if kvm_runs is not False else "qemu")
    else:
        assert domain_type == "qemu"
    name = unique()
    disk = tmp_path / "boot.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    xml = domain_xml(_vm(name, "bios").model_copy(update={"nics": []}),
                     [DomainDisk(disk, "qcow2")], domain_type=domain_type, cpu=cpu)
    define_domain(libvirt_uri, xml, name=name, autostart=False, replace=False)
    try:
        assert start_and_stop(name)
    finally:
        undefine_domain(libvirt_uri, name)
