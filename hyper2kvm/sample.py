"""A small but real VM to migrate: an OVA whose VMDK has a GPT partition table and an
ext4 filesystem with files in it. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from core.errors import ConversionError
from core.models import DiskInfo, NicInfo, VMInfo
from hyper2kvm import ova, qemu_img
from hyper2kvm.ovf import write_descriptor

MIB = 1024 * 1024
GUEST_BUILDER = Path(__file__).resolve().parents[1] / "scripts" / "build-guest.sh"


def _run(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True)


def make_disk(raw: Path, *, size_mib: int, random_mib: int = 0, hostname: str = "sample") -> None:
    """A raw disk: GPT, one Linux partition from 1 MiB, ext4 holding a few files (and
    `random_mib` MiB of incompressible data)."""
    with raw.open("wb") as stream:
        stream.truncate(size_mib * MIB)
    _run("sfdisk", "--quiet", str(raw), stdin="label: gpt\nstart=2048, type=L\n")
    with tempfile.TemporaryDirectory() as content:
        root = Path(content)
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text(f"{hostname}\n")
        (root / "README").write_text("Migrated by hypersdk.\n")
        if random_mib:
            with (root / "random.bin").open("wb") as data:
                for _ in range(random_mib):
                    data.write(os.urandom(MIB))
        fs_kib = (size_mib - 2) * 1024  # 1 MiB before the partition, GPT backup after
        _run("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={MIB}", "-d", content,
             str(raw), f"{fs_kib}k")


def build_guest_disk(*, timeout: float | None = None) -> Path:
    """The raw disk of a real Debian guest as VMware leaves one (scripts/build-guest.sh),
    built once per machine and cached outside the checkout."""
    built = subprocess.run([str(GUEST_BUILDER)], capture_output=True, text=True,
                           timeout=timeout)
    if built.returncode != 0:
        said = [line for line in built.stderr.splitlines() if line.strip()][-5:]
        raise ConversionError(f"{GUEST_BUILDER.name} could not build the guest: "
                              + ("; ".join(said) or f"exit status {built.returncode}"))
    return Path(built.stdout.strip().splitlines()[-1])


def make_sample_ova(
    directory: Path,
    name: str = "sample-vm",
    *,
    size_mib: int = 64,
    random_mib: int = 0,
    cpus: int = 2,
    memory_mb: int = 512,
    firmware: str = "bios",
    mac: str = "52:54:00:12:34:56",
    guest_disk: Path | None = None,
) -> Path:
    """Write `directory/<name>.ova` and return its path. Its disk is a fresh data disk,
    or the raw `guest_disk` (a bootable guest, scripts/build-guest.sh), read only."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        staging = Path(work)
        raw = guest_disk or staging / "disk.raw"
        if guest_disk is None:
            make_disk(raw, size_mib=size_mib, random_mib=random_mib, hostname=name)
        else:
            size_mib = -(-raw.stat().st_size // MIB)
        vmdk = staging / f"{name}-disk1.vmdk"
        qemu_img.convert(qemu_img.DiskSource(raw, "raw"), vmdk, output_format="vmdk",
                         subformat="streamOptimized")
        if guest_disk is None:
            raw.unlink()
        vm = VMInfo(
            identifier=name, name=name, provider="local", cpus=cpus, memory_mb=memory_mb,
            firmware=firmware,  # type: ignore[arg-type]
            guest_os="debian12_64Guest",
            disks=[DiskInfo(name="vmdisk1", capacity_bytes=size_mib * MIB, file=vmdk.name)],
            nics=[NicInfo(mac=mac, network="VM Network", adapter="vmxnet3")],
        )
        target = directory / f"{name}.ova"
        ova.write_ova(target, write_descriptor(staging, vm, [vmdk]))
    return target
