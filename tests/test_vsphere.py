"""The vSphere provider against a running vCenter simulator (govmomi's vcsim): sessions,
inventory, export over NFC and the datastore interface, packaging, power handling."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from core.config import Config
from core.errors import AuthFailed, InvalidRequest, NotFound, Transient, Unsupported
from core.models import ExportOptions, PowerState, VMFilter
from hyper2kvm import ova
from hyper2kvm.manifest import parse_manifest
from hyper2kvm.ovf import parse_ovf
from providers import get_provider
from providers.vsphere.session import pool_for
from tests.helpers import make_random_raw
from tests.peers import free_port, unique
from tests.vsphere_sim import (
    PASSWORD,
    USER,
    Vcsim,
    create_vm,
    find_vm,
    give_disk_content,
    server_certificate,
)


def settings_for(host: str, **section: Any) -> Config:
    return Config.model_validate({
        "providers": {"vsphere": {"host": host, "username": USER, "password": PASSWORD,
                                  "insecure": True, **section}},
        "export": {"max_retries": 3, "chunk_size": 1 << 20, "disk_concurrency": 2},
    })


def provider_for(host: str, **section: Any) -> Any:
    return get_provider("vsphere", settings_for(host, **section))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_disk(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Two disks of random bytes (8 and 4 MiB) to be a VM's content."""
    return [make_random_raw(tmp_path, "a", 8), make_random_raw(tmp_path, "b", 4)]


# ---- connection ---------------------------------------------------------------------------


def test_wrong_password_is_a_clear_auth_error(vcsim: Vcsim) -> None:
    with pytest.raises(AuthFailed, match="login refused for user"):
        provider_for(vcsim.host, password="wrong").list_vms(VMFilter())


def test_unreachable_host_is_transient() -> None:
    with pytest.raises(Transient, match="cannot reach"):
        provider_for(f"127.0.0.1:{free_port()}").list_vms(VMFilter())


def test_tls_is_verified_unless_told_otherwise(vcsim: Vcsim, tmp_path: Path) -> None:
    with pytest.raises(AuthFailed, match="TLS"):
        provider_for(vcsim.host, insecure=False).list_vms(VMFilter())
    ca, _ = server_certificate()
    pem = ca.read_text()
    assert provider_for(vcsim.host, insecure=False, ca_file=str(ca)).list_vms(VMFilter())
    der = ssl.PEM_cert_to_DER_cert(pem)
    sha1 = hashlib.sha1(der).hexdigest()  # noqa: S324 - vSphere shows SHA-1 thumbprints
    colons = ":".join(sha1[i:i + 2] for i in range(0, 40, 2)).upper()
    assert provider_for(vcsim.host, insecure=False, thumbprint=colons).list_vms(VMFilter())
    with pytest.raises(AuthFailed, match="thumbprint"):
        provider_for(vcsim.host, insecure=False, thumbprint="00" * 20).list_vms(VMFilter())


def test_sessions_are_pooled_and_logged_in_again_when_expired(vcsim: Vcsim) -> None:
    settings = settings_for(vcsim.host, connection_pool_size=2)
    provider = get_provider("vsphere", settings)
    assert provider.list_vms(VMFilter())
    pool = pool_for(settings.providers.vsphere)  # type: ignore[arg-type]
    with pool.session() as session:
        first = session.instance
        session.instance.content.sessionManager.Logout()  # as if the session had expired
    assert provider.list_vms(VMFilter())  # logs in again, transparently
    with pool.session() as session:
        assert session.instance is not first
    # the same pool serves every provider object with these settings
    assert pool_for(get_provider("vsphere", settings).config) is pool  # type: ignore[arg-type]
    assert pool._created == 1


# ---- inventory ----------------------------------------------------------------------------


def test_vm_info_reads_the_whole_hardware(vcsim: Vcsim, si: Any) -> None:
    name = unique("t-hw")
    vm = create_vm(si, name, disks_mib=[8, 4], cpus=4, memory_mb=2048, firmware="efi",
                   secure_boot=True, macs=("00:50:56:aa:bb:01", "00:50:56:aa:bb:02"),
                   cdrom=True, guest_id="rhel9_64Guest")
    info = provider_for(vcsim.host).get_vm(vm._moId)
    assert (info.name, info.cpus, info.memory_mb) == (name, 4, 2048)
    assert (info.firmware, info.secure_boot, info.guest_os) == ("efi", True, "rhel9_64Guest")
    assert [(d.capacity_bytes, d.controller, d.unit) for d in info.disks] == [
        (8 << 20, "scsi", 0), (4 << 20, "scsi", 1)]
    assert info.disks[1].file == f"[LocalDS_0] {name}/{name}_1.vmdk"
    assert info.disks[0].datastore == "LocalDS_0"
    assert [(n.mac, n.adapter, n.network) for n in info.nics] == [
        ("00:50:56:aa:bb:01", "vmxnet3", "VM Network"),
        ("00:50:56:aa:bb:02", "vmxnet3", "VM Network")]
    assert info.cdroms == 1
    assert info.power_state == PowerState.POWERED_OFF
    assert (info.datacenter, info.folder) == ("DC0", "/DC0/vm")
    # the same VM by name and by inventory path
    provider = provider_for(vcsim.host)
    assert provider.get_vm(name).identifier == vm._moId
    assert provider.get_vm(f"/DC0/vm/{name}").identifier == vm._moId
    with pytest.raises(NotFound, match="no VM"):
        provider.get_vm("vm-does-not-exist")


def _vapi(vcsim: Vcsim) -> httpx.Client:
    client = httpx.Client(base_url=f"https://{vcsim.host}/rest/com/vmware/cis", verify=False)
    token = client.post("/session", auth=(USER, PASSWORD)).raise_for_status().json()["value"]
    client.headers["vmware-api-session-id"] = token
    return client


def test_list_filters_on_datacenter_status_folder_name_and_tags(vcsim: Vcsim, si: Any) -> None:
    prefix = unique("t-web")
    content = si.RetrieveContent()
    folder = content.rootFolder.childEntity[0].vmFolder.CreateFolder(f"{prefix}-folder")
    tagged = create_vm(si, f"{prefix}-1", disks_mib=[1])
    other = create_vm(si, f"{prefix}-2", disks_mib=[1])
    moved = create_vm(si, f"{prefix}-3", disks_mib=[1])
    WaitForTask(folder.MoveIntoFolder_Task([moved]))
    WaitForTask(other.PowerOnVM_Task())
    # a vSphere tag (vAPI) and a custom attribute (SOAP)
    rest = _vapi(vcsim)
    try:
        category = rest.post("/tagging/category", json={"create_spec": {
            "name": f"{prefix}-cat", "description": "", "cardinality": "MULTIPLE",
            "associable_types": []}}).raise_for_status().json()["value"]
        tag = rest.post("/tagging/tag", json={"create_spec": {
            "name": f"{prefix}-backup", "description": "", "category_id": category}}
        ).raise_for_status().json()["value"]
        rest.post(f"/tagging/tag-association/id:{tag}", params={"~action": "attach"},
                  json={"object_id": {"type": "VirtualMachine", "id": tagged._moId}}
                  ).raise_for_status()
    finally:
        rest.close()
    field = content.customFieldsManager.AddCustomFieldDef(name=f"{prefix}-owner",
                                                          moType=vim.VirtualMachine)
    content.customFieldsManager.SetField(entity=moved, key=field.key, value="alice")

    provider = provider_for(vcsim.host)

    def names(**filters: Any) -> list[str]:
        return sorted(vm.name for vm in provider.list_vms(VMFilter(**filters)))

    everyone = [f"{prefix}-1", f"{prefix}-2", f"{prefix}-3"]
    assert names(name_pattern=f"{prefix}-*") == everyone
    assert names(name_pattern=f"{prefix}-*", datacenter="DC0") == everyone
    assert names(name_pattern=f"{prefix}-*", datacenter="DC9") == []
    assert names(name_pattern=f"{prefix}-*", status="poweredOn") == [f"{prefix}-2"]
    assert names(name_pattern=f"{prefix}-*", status="poweredOff") == [f"{prefix}-1",
                                                                        f"{prefix}-3"]
    assert names(folder=f"/DC0/vm/{prefix}-folder") == [f"{prefix}-3"]
    assert names(tags=[f"{prefix}-backup"]) == [f"{prefix}-1"]
    assert names(tags=[f"{prefix}-owner=alice"]) == [f"{prefix}-3"]


def test_list_a_thousand_vms() -> None:
    from tests.vsphere_sim import start_vcsim

    big = start_vcsim("upstream", vms=500)  # 500 per resource pool, 2 pools
    try:
        started = time.monotonic()
        vms = provider_for(big.host).list_vms(VMFilter())
        elapsed = time.monotonic() - started
    finally:
        big.stop()
    assert len(vms) == 1000
    assert all(vm.datacenter == "DC0" and vm.folder == "/DC0/vm" for vm in vms)
    print(f"listed {len(vms)} VMs in {elapsed:.2f} s")


# ---- export -------------------------------------------------------------------------------


def _progress() -> tuple[list[int], Any]:
    moved: list[int] = []
    return moved, moved.append


def test_datastore_export_as_ovf(vcsim: Vcsim, si: Any, images: list[Path],
                                 tmp_path: Path) -> None:
    name = unique("t-ds")
    vm = create_vm(si, name, disks_mib=[8, 4], cpus=2, memory_mb=1024,
                   macs=("00:50:56:01:02:03",))
    give_disk_content(vcsim, vm, images, layout="flat")  # descriptor + -flat, as on ESXi
    moved, progress = _progress()
    dest = tmp_path / "export"
    result = provider_for(vcsim.host).export(
        vm._moId, dest, method="ovf", options=ExportOptions(transport="datastore"),
        progress=progress)
    roles = sorted((f.role, f.path.name) for f in result.files)
    assert roles == sorted([
        ("ovf", f"{name}.ovf"), ("manifest", f"{name}.mf"),
        ("disk", f"{name}.vmdk"), ("disk", f"{name}_1.vmdk"),
        ("other", f"{name}-flat.vmdk"), ("other", f"{name}_1-flat.vmdk")])
    for file in result.files:
        assert file.sha256 == sha256(file.path) and file.size == file.path.stat().st_size
    manifest = parse_manifest((dest / f"{name}.mf").read_text())
    assert {n: d for n, (_, d) in manifest.items()} == {
        f.path.name: f.sha256 for f in result.files if f.role != "manifest"}
    assert sum(moved) == sum(f.size for f in result.files if f.role in ("disk", "other"))
    for disk, image in zip(result.vm.disks, images, strict=True):
        assert same_disk(dest / str(disk.file), image)
    described = parse_ovf((dest / f"{name}.ovf").read_bytes()).vm
    assert (described.cpus, described.memory_mb) == (2, 1024)
    assert [n.mac for n in described.nics] == ["00:50:56:01:02:03"]
    assert [d.capacity_bytes for d in described.disks] == [8 << 20, 4 << 20]
    assert not list(dest.glob(".*partial"))


def test_nfc_export_downloads_every_disk_through_a_lease(vcsim: Vcsim, si: Any,
                                                         images: list[Path],
                                                         tmp_path: Path) -> None:
    name = unique("t-nfc")
    vm = create_vm(si, name, disks_mib=[8, 4])
    give_disk_content(vcsim, vm, images, layout="stream")  # what an NFC export serves
    moved, progress = _progress()
    result = provider_for(vcsim.host).export(
        vm._moId, tmp_path, method="vmdk", options=ExportOptions(transport="nfc"),
        progress=progress)
    disks = [f for f in result.files if f.role == "disk"]
    assert [f.path.name for f in disks] == ["disk-0.vmdk", "disk-1.vmdk"]
    for file, image in zip(disks, images, strict=True):
        assert same_disk(file.path, image)
        assert file.sha256 == sha256(file.path)
    assert sum(moved) == sum(f.size for f in disks)
    # both came through the simulator's NFC data path, each whole
    log = vcsim.log.read_text()
    for file in disks:
        assert f"transferred {file.size} bytes" in log


def test_nfc_without_exportvm_fails_clearly_and_auto_falls_back(
        vcsim_upstream: Vcsim, images: list[Path], tmp_path: Path) -> None:
    si = vcsim_upstream.connect()
    name = unique("t-up")
    vm = create_vm(si, name, disks_mib=[8, 4])
    give_disk_content(vcsim_upstream, vm, images, layout="flat")
    provider = provider_for(vcsim_upstream.host)
    with pytest.raises(Unsupported, match="not supported by this server"):
        provider.export(vm._moId, tmp_path / "nfc", method="ovf",
                        options=ExportOptions(transport="nfc"))
    assert not any((tmp_path / "nfc").iterdir())
    result = provider.export(vm._moId, tmp_path / "auto", method="ovf",
                             options=ExportOptions(transport="auto"))
    for disk, image in zip(result.vm.disks, images, strict=True):
        assert same_disk(tmp_path / "auto" / str(disk.file), image)


class CuttingProxy(threading.Thread):
    """A TCP proxy that drops the first connection carrying more than `cut_after` bytes
    from the server, mid-transfer; every other connection passes untouched."""

    def __init__(self, target: str, cut_after: int) -> None:
        super().__init__(daemon=True)
        host, port = target.split(":")
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        seen = 0
        try:
            while data := source.recv(1 << 16):
                seen += len(data)
                if downstream and self.cuts == 0 and seen > self.cut_after:
                    self.cuts += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_download_cut_mid_file_resumes_with_range(vcsim: Vcsim, si: Any, images: list[Path],
                                                    tmp_path: Path) -> None:
    name = unique("t-cut")
    vm = create_vm(si, name, disks_mib=[8])
    give_disk_content(vcsim, vm, images[:1], layout="flat")
    proxy = CuttingProxy(vcsim.host, cut_after=3 << 20)
    proxy.start()
    try:
        moved, progress = _progress()
        settings = settings_for(proxy.address)
        settings.export.disk_concurrency = 1
        result = get_provider("vsphere", settings).export(
            vm._moId, tmp_path, method="vmdk", options=ExportOptions(transport="datastore"),
            progress=progress)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    flat = tmp_path / f"{name}-flat.vmdk"
    assert sha256(flat) == sha256(images[0])  # monolithicFlat extent = the raw bytes
    # resumed where it broke: no byte was fetched twice
    assert sum(moved) == sum(f.size for f in result.files)


def test_powered_on_vm_is_refused_without_shutdown(vcsim: Vcsim, si: Any, images: list[Path],
                                                   tmp_path: Path) -> None:
    name = unique("t-on")
    vm = create_vm(si, name, disks_mib=[8])
    give_disk_content(vcsim, vm, images[:1], layout="stream")
    WaitForTask(vm.PowerOnVM_Task())
    provider = provider_for(vcsim.host)
    with pytest.raises(InvalidRequest, match="poweredOn.*shutdown_vm"):
        provider.export(vm._moId, tmp_path / "refused", method="vmdk", options=ExportOptions())
    assert find_vm(si, name).runtime.powerState == "poweredOn"
    result = provider.export(vm._moId, tmp_path / "ok", method="vmdk",
                             options=ExportOptions(shutdown_vm=True, shutdown_timeout=30,
                                                   restore_power_state=True))
    assert same_disk(result.files[0].path, images[0])
    assert find_vm(si, name).runtime.powerState == "poweredOn"  # restored as asked
    provider.export(vm._moId, tmp_path / "off", method="vmdk",
                    options=ExportOptions(shutdown_vm=True, shutdown_timeout=30))
    assert find_vm(si, name).runtime.powerState == "poweredOff"


def test_ova_drops_cdroms_from_the_descriptor_only_and_compresses(
        vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    # half random, half compressible text: compression must show
    images = []
    for index, size in enumerate((8, 4)):
        image = tmp_path / f"text{index}.raw"
        half = size << 19
        image.write_bytes(os.urandom(half) + (b"hypersdk " * (half // 9 + 1))[:half])
        images.append(image)
    name = unique("t-ova")
    vm = create_vm(si, name, disks_mib=[8, 4], cdrom=True)
    give_disk_content(vcsim, vm, images, layout="flat")
    provider = provider_for(vcsim.host)
    result = provider.export(vm._moId, tmp_path / "ova", method="ova",
                             options=ExportOptions(remove_cdrom=True, compress=True,
                                                   transport="datastore"))
    [package] = result.files
    assert package.role == "ova" and package.sha256 == sha256(package.path)
    members = ova.read_members(package.path)
    assert list(members)[0] == f"{name}.ovf"  # descriptor first
    described = parse_ovf(ova.read_member(package.path, members[f"{name}.ovf"])).vm
    assert described.cdroms == 0
    for disk, image in zip(described.disks, images, strict=True):
        member = members[str(disk.file)]
        raw = ova.read_member(package.path, member)
        assert b"streamOptimized" in raw[:4096]  # compressed grains
        assert len(raw) < 0.7 * image.stat().st_size
        extracted = tmp_path / str(disk.file)
        extracted.write_bytes(raw)
        assert same_disk(extracted, image)
    kept = provider.export(vm._moId, tmp_path / "ovf", method="ovf",
                           options=ExportOptions(remove_cdrom=False, transport="datastore"))
    ovf = next(f.path for f in kept.files if f.role == "ovf")
    assert parse_ovf(ovf.read_bytes()).vm.cdroms == 1
    # the source VM was never reconfigured
    assert any(isinstance(d, vim.vm.device.VirtualCdrom)
               for d in find_vm(si, name).config.hardware.device)


def test_nfc_lease_is_released_when_a_download_fails_and_retried_without_range(
        vcsim: Vcsim, si: Any, images: list[Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pyVmomi import vmodl

    from providers.vsphere import export as export_module

    name = unique("t-abort")
    vm = create_vm(si, name, disks_mib=[8])
    give_disk_content(vcsim, vm, images[:1], layout="stream")
    leases: list[Any] = []
    keeper = export_module.LeaseKeeper

    class Spy(keeper):  # type: ignore[misc, valid-type]
        def __init__(self, lease: Any, total: int) -> None:
            leases.append(lease)
            super().__init__(lease, total)

    monkeypatch.setattr(export_module, "LeaseKeeper", Spy)
    proxy = CuttingProxy(vcsim.host, cut_after=2 << 20)
    proxy.start()
    try:
        settings = settings_for(proxy.address)
        settings.export.max_retries = 0
        with pytest.raises(Transient, match="transfer failed"):
            get_provider("vsphere", settings).export(
                vm._moId, tmp_path / "cut", method="vmdk", options=ExportOptions(transport="nfc"))
        assert proxy.cuts == 1
        assert not any((tmp_path / "cut").iterdir())  # nothing half-written left
        with pytest.raises(vmodl.fault.ManagedObjectNotFound):
            _ = leases[0].state  # aborted: the server dropped the lease
        # NFC has no Range: a retry reads the disk again from the start, and is whole
        proxy.cuts = 0
        settings.export.max_retries = 2
        result = get_provider("vsphere", settings).export(
            vm._moId, tmp_path / "retry", method="vmdk", options=ExportOptions(transport="nfc"))
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert same_disk(result.files[0].path, images[0])
    assert result.files[0].sha256 == sha256(result.files[0].path)
