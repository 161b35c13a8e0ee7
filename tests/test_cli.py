"""The hyper2kvm command, run as a process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hyper2kvm import qemu_img
from tests.helpers import domain_facts, make_truncated_ova, source_disk_as_raw
from tests.peers import BIN, unique


def hyper2kvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "hyper2kvm"), *args], capture_output=True, text=True,
                          timeout=300)


def test_convert_inspect_and_import(tmp_path: Path, libvirt_uri: str) -> None:
    name = unique()
    made = hyper2kvm("make-sample", str(tmp_path), "--name", name, "--size-mib", "24", "--json")
    assert made.returncode == 0, made.stderr
    ova_path = Path(json.loads(made.stdout)["path"])

    inspected = json.loads(hyper2kvm("inspect", str(ova_path), "--json").stdout)
    assert inspected["kind"] == "ova" and inspected["vm"]["cpus"] == 2
    assert inspected["vmdk"][f"{name}-disk1.vmdk"]["create_type"] == "streamOptimized"

    out = tmp_path / "out"
    done = hyper2kvm("convert", str(ova_path), "--output-dir", str(out), "--format", "raw",
                     "--checksum")
    assert done.returncode == 0, done.stderr
    assert "100.0%" in done.stderr  # plain progress lines when not on a terminal
    result = json.loads(done.stdout)
    disk = Path(result["disks"][0]["path"])
    assert disk.parent == out / name and result["disks"][0]["verified"] == "sha256"
    assert len(result["disks"][0]["sha256"]) == 64
    assert qemu_img.compare(source_disk_as_raw(ova_path, tmp_path / "src.raw"), disk)

    imported = hyper2kvm("import", "--name", name, "--disk", str(disk), "--memory-mb", "384",
                         "--vcpus", "1", "--network", "user", "--autostart", "--uri",
                         libvirt_uri, "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["autostart"] is True
    facts = domain_facts(name)
    assert facts["vcpus"] == 1 and facts["disks"] == [str(disk)]


def test_corrupt_input_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    name = unique()
    bad = make_truncated_ova(tmp_path, name)
    out = tmp_path / "out"
    done = hyper2kvm("convert", str(bad), "--output-dir", str(out), "--json")
    assert done.returncode == 1
    assert done.stderr.startswith("hyper2kvm: error:") and "qemu-img" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / name).exists()
    missing = hyper2kvm("inspect", str(tmp_path / "nope.ova"))
    assert missing.returncode == 1 and "not a file" in missing.stderr


def test_a_two_disk_vm_converts_both_disks(tmp_path: Path) -> None:
    from core.models import DiskInfo, VMInfo
    from hyper2kvm import ova
    from hyper2kvm.ovf import write_descriptor
    from hyper2kvm.sample import make_disk

    name = unique()
    raws, vmdks = [], []
    for index, size in enumerate((16, 24), 1):
        raw = tmp_path / f"d{index}.raw"
        make_disk(raw, size_mib=size, random_mib=2, hostname=f"disk{index}")
        vmdk = tmp_path / f"{name}-disk{index}.vmdk"
        qemu_img.convert(qemu_img.DiskSource(raw, "raw"), vmdk, output_format="vmdk",
                         subformat="streamOptimized")
        raws.append(raw)
        vmdks.append(vmdk)
    vm = VMInfo(identifier=name, name=name, provider="local",
                disks=[DiskInfo(name=f"d{i}", capacity_bytes=s * 2**20)
                       for i, s in enumerate((16, 24), 1)])
    package = tmp_path / f"{name}.ova"
    ova.write_ova(package, write_descriptor(tmp_path, vm, vmdks))
    done = hyper2kvm("convert", str(package), "--output-dir", str(tmp_path / "out"),
                     "--preallocation", "metadata", "--json")
    assert done.returncode == 0, done.stderr
    disks = json.loads(done.stdout)["disks"]
    assert [d["verified"] for d in disks] == ["sha256", "sha256"]
    for raw, disk in zip(raws, disks, strict=True):
        assert qemu_img.compare(raw, Path(disk["path"]))
        assert qemu_img.info(Path(disk["path"]))["format"] == "qcow2"

