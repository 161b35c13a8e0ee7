"""The vCenter simulator as a test peer: govmomi's vcsim built from Debian's sources by
tests/vcsim/build.sh (when missing), started on a free port, and helpers that give its
VMs real disk content (vcsim's own disks are 0-byte placeholders)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.peers import ROOT, SESSION_DIR, VSPHERE_PASSWORD, VSPHERE_USER, free_port
from tests.tcp_proxy import Throttle, start_proxy

VCSIM_DIR = ROOT / "tests" / "vcsim"
VCSIM_BIN = VCSIM_DIR / "bin"
USER, PASSWORD = VSPHERE_USER, VSPHERE_PASSWORD


@dataclass
class Vcsim:
    """A running simulator."""

    process: subprocess.Popen
    url: str  # https://127.0.0.1:PORT/sdk
    datastores: dict[str, str]  # name → its local folder
    log: Path  # the simulator's own log (NFC transfers are logged there)

    @property
    def host(self) -> str:
        return self.url.split("/")[2]

    def connect(self) -> Any:
        host, port = self.host.split(":")
        return SmartConnect(host=host, port=int(port), user=USER, pwd=PASSWORD,
                            disableSslCertValidation=True)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def build_vcsim() -> None:
    subprocess.run([str(VCSIM_DIR / "build.sh"), str(VCSIM_BIN)], check=True, timeout=600)


def server_certificate() -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (Go's built-in test certificate has a
    1024-bit key, which OpenSSL refuses to verify)."""
    cert, key = SESSION_DIR / "vcsim.pem", SESSION_DIR / "vcsim.key"
    if not cert.exists():
        SESSION_DIR.mkdir(parents=True, exist_ok=True)  # a script's earlier peers removed it
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
    return cert, key


def start_vcsim(flavor: str = "nfc", *, vms: int = 2, port: int | None = None) -> Vcsim:
    """flavor 'nfc': our build with ExportVm; 'upstream': govmomi's simulator as packaged."""
    build_vcsim()
    cert, key = server_certificate()
    log_path = SESSION_DIR / f"vcsim-{flavor}-{time.monotonic_ns()}.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [str(VCSIM_BIN / f"vcsim-{flavor}"), "-listen", f"127.0.0.1:{port or free_port()}",
         "-username", USER, "-password", PASSWORD, "-vm", str(vms),
         "-cert", str(cert), "-key", str(key)],
        stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"vcsim did not start; see {log_path}")
    facts = json.loads(line)
    return Vcsim(process=process, url=facts["url"], datastores=facts["datastores"],
                 log=log_path)


@pytest.fixture(scope="session")
def vcsim() -> Iterator[Vcsim]:
    server = start_vcsim("nfc")
    yield server
    server.stop()


@dataclass
class VcsimProxy:
    """The session's simulator behind a shaping TCP proxy (the test daemon's vsphere
    host): a test slows or cuts what the simulator sends."""

    address: str  # 127.0.0.1:PORT
    throttle: Throttle


@pytest.fixture(scope="session")
def vcsim_proxy(vcsim: Vcsim) -> VcsimProxy:
    throttle = Throttle()
    port = start_proxy(int(vcsim.host.rsplit(":", 1)[1]), throttle)
    return VcsimProxy(address=f"127.0.0.1:{port}", throttle=throttle)


@pytest.fixture(scope="session")
def vcsim_upstream() -> Iterator[Vcsim]:
    server = start_vcsim("upstream")
    yield server
    server.stop()


@pytest.fixture
def si(vcsim: Vcsim) -> Iterator[Any]:
    instance = vcsim.connect()
    yield instance
    Disconnect(instance)


def find_vm(si: Any, name: str) -> Any:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(vm for vm in view.view if vm.name == name)
    finally:
        view.Destroy()


def create_vm(si: Any, name: str, *, disks_mib: list[int], cpus: int = 2, memory_mb: int = 512,
              firmware: str = "bios", secure_boot: bool = False, macs: tuple[str, ...] = (),
              cdrom: bool = False, guest_id: str = "otherLinux64Guest",
              datastore: str = "LocalDS_0") -> Any:
    """A VM made through the vSphere API (CreateVM_Task), powered off."""
    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    pool = datacenter.hostFolder.childEntity[0].resourcePool
    spec_dev = vim.vm.device.VirtualDeviceSpec
    controller = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0,
                                                          sharedBus="noSharing")
    changes = [spec_dev(operation="add", device=controller)]
    for unit, size in enumerate(disks_mib):
        disk = vim.vm.device.VirtualDisk(
            key=2000 + unit, controllerKey=1000, unitNumber=unit, capacityInKB=size * 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{datastore}] {name}/{name}{'_' + str(unit) if unit else ''}.vmdk",
                diskMode="persistent", thinProvisioned=True))
        changes.append(spec_dev(operation="add", fileOperation="create", device=disk))
    for index, mac in enumerate(macs):
        nic = vim.vm.device.VirtualVmxnet3(
            key=4000 + index, addressType="manual", macAddress=mac,
            backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName="VM Network"))
        changes.append(spec_dev(operation="add", device=nic))
    if cdrom:
        ide = vim.vm.device.VirtualIDEController(key=200, busNumber=0)
        changes.append(spec_dev(operation="add", device=ide))
        changes.append(spec_dev(operation="add", device=vim.vm.device.VirtualCdrom(
            key=3000, controllerKey=200, unitNumber=0,
            backing=vim.vm.device.VirtualCdrom.RemotePassthroughBackingInfo(
                deviceName="", exclusive=False))))
    config = vim.vm.ConfigSpec(
        name=name, numCPUs=cpus, memoryMB=memory_mb, guestId=guest_id, firmware=firmware,
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}] {name}"), deviceChange=changes,
        bootOptions=vim.vm.BootOptions(efiSecureBootEnabled=secure_boot))
    WaitForTask(datacenter.vmFolder.CreateVM_Task(config=config, pool=pool))
    return find_vm(si, name)


def put_file(server: Vcsim, datastore_path: str, source: Path) -> None:
    """PUT a file over the datastore HTTP interface (as an admin uploading a disk does)."""
    datastore, path = datastore_path[1:].split("] ", 1)
    with source.open("rb") as body:
        response = httpx.put(f"https://{server.host}/folder/{path}",
                             params={"dcPath": "DC0", "dsName": datastore}, content=body,
                             verify=False, timeout=300)
    response.raise_for_status()


def vm_disk_paths(vm: Any) -> list[str]:
    return [d.backing.fileName for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk)]


def give_disk_content(server: Vcsim, vm: Any, images: list[Path], *,
                      layout: str | list[str]) -> None:
    """Write real disks for the VM's disks. layout 'flat': a monolithicFlat descriptor plus
    its -flat extent, as ESXi stores disks; 'stream': one streamOptimized VMDK each, as an
    NFC export serves them; a list: one layout per disk."""
    work = SESSION_DIR / f"vcsim-disks-{time.monotonic_ns()}"
    work.mkdir()
    layouts = layout if isinstance(layout, list) else [layout] * len(images)
    for datastore_path, image, layout in zip(vm_disk_paths(vm), images, layouts,
                                             strict=True):
        name = datastore_path.rsplit("/", 1)[1]
        target = work / name
        subformat = "monolithicFlat" if layout == "flat" else "streamOptimized"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o",
                        f"subformat={subformat}", str(image), str(target)], check=True)
        put_file(server, datastore_path, target)
        if layout == "flat":
            flat = target.with_name(target.stem + "-flat.vmdk")
            put_file(server, datastore_path.replace(name, flat.name), flat)
