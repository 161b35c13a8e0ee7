"""The boot check sees a guest come up every time, and says what it saw when it does not:
small hand-assembled boot sectors that print what a guest's console prints, OVMF on a
disk with nothing to boot, and the demo's converted Debian guest booted ten times."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import libvirt
import pytest

from core.models import NicInfo, VMInfo
from hyper2kvm.boot import DEAD_ENDS, BootOutcome, verify_boot
from hyper2kvm.cpu import domain_type_and_cpu
from hyper2kvm.domain import DomainDisk, NetworkMap, domain_xml
from hyper2kvm.registration import define_domain, undefine_domain
from hyper2kvm.sample import make_disk
from tests.helpers import boot_sector_disk
from tests.peers import unique


def _boot(uri: str, disk: Path, fmt: str = "raw", *, timeout: float, firmware: str = "bios",
          memory_mb: int = 256, pattern: str | None = None, name: str = "") -> BootOutcome:
    """Define a VM on `disk` as a migration would (one NIC), boot-check it, undefine it."""
    name = name or unique("boot")
    domain_type, cpu = domain_type_and_cpu("auto", uri)
    vm = VMInfo(identifier=name, name=name, provider="local", memory_mb=memory_mb,
                firmware=firmware, nics=[NicInfo(mac="52:54:00:5e:00:09", network="VM Network")])
    define_domain(uri, domain_xml(vm, [DomainDisk(disk, fmt)], domain_type=domain_type,
                                  cpu=cpu, networks=NetworkMap(default="user")),
                  name=name, autostart=False, replace=False)
    try:
        return verify_boot(uri, name, timeout=timeout, pattern=pattern)
    finally:
        undefine_domain(uri, name)


def test_a_login_prompt_followed_by_firstboot_output_on_its_line_is_seen(
    libvirt_uri: str, tmp_path: Path
) -> None:
    # what the demo guest printed when the check missed its prompt: virt-v2v's firstboot
    # script (apt-get install qemu-guest-agent) writes to the console as getty starts
    disk = boot_sector_disk(tmp_path / "prompt.raw", (
        b"\r\nDebian GNU/Linux 12 tiny ttyS0\r\n\r\ntiny login: [   35.1] firstboot.sh[338]: "
        b"Ign:1 http://deb.debian.org/debian bookworm InRelease\r\n"))
    outcome = _boot(libvirt_uri, disk, timeout=120)
    assert outcome.booted, outcome
    assert "tiny login:" in outcome.reason


def test_a_getty_that_prompts_only_after_enter_is_sent_enter(
    libvirt_uri: str, tmp_path: Path
) -> None:
    disk = boot_sector_disk(tmp_path / "enter.raw", b"\r\nquiet login: ", wait_for_key=True)
    outcome = _boot(libvirt_uri, disk, timeout=120)
    assert outcome.booted, outcome
    assert "quiet login:" in outcome.reason


def test_a_guest_that_prints_nothing_times_out_says_so_and_writes_nothing(
    libvirt_uri: str, tmp_path: Path
) -> None:
    disk = tmp_path / "spin.raw"
    with disk.open("wb") as stream:  # a boot sector that loops forever: jmp $
        stream.truncate(1 << 20)
        stream.write(b"\xeb\xfe")
        stream.seek(510)
        stream.write(b"\x55\xaa")
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    name = unique("spin")
    outcome = _boot(libvirt_uri, disk, timeout=20, name=name)
    assert not outcome.booted
    assert outcome.reason.startswith("not up within 20 s: the console showed nothing after "
                                     "the firmware's 'Booting from Hard Disk"), outcome
    assert outcome.console and outcome.console[-1].startswith("Booting from Hard Disk")
    assert outcome.seconds >= 20
    # the disk was only read (through an overlay), and nothing is left beside it
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spin.raw"]
    conn = libvirt.open(libvirt_uri)
    try:
        assert not [d.name() for d in conn.listAllDomains() if d.name().startswith(name)]
    finally:
        conn.close()


def test_a_guest_that_stops_at_a_dead_end_shows_its_last_lines(
    libvirt_uri: str, tmp_path: Path
) -> None:
    disk = boot_sector_disk(tmp_path / "panic.raw", (
        b"\r\n[    1.9] VFS: Cannot open root device \"sda1\"\r\n"
        b"[    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"))
    outcome = _boot(libvirt_uri, disk, timeout=300)
    assert not outcome.booted
    assert outcome.reason.startswith("no root file system: Unable to mount root fs"), outcome
    assert any("Kernel panic - not syncing" in line for line in outcome.console), outcome


def test_a_dead_end_line_that_arrives_in_pieces_is_read_whole() -> None:
    # the console is read as the guest prints it: a panic line cut after "Unable to"
    # must wait for its end (CI once read "kernel panic: ... VFS: Unable to")
    head = "[    2.0] Kernel panic - not syncing: VFS: Unable to"
    assert not DEAD_ENDS["kernel panic"].search(head)
    assert not DEAD_ENDS["no root file system"].search(head)
    whole = head + " mount root fs on unknown-block(0,0)\n"
    found = DEAD_ENDS["kernel panic"].search(whole)
    assert found and found.group(0).endswith("unknown-block(0,0)")


def test_uefi_with_nothing_to_boot_ends_at_its_shell_not_the_timeout(
    libvirt_uri: str, tmp_path: Path
) -> None:
    disk = tmp_path / "data.raw"
    make_disk(disk, size_mib=16)
    outcome = _boot(libvirt_uri, disk, timeout=550, firmware="efi")
    assert not outcome.booted
    assert outcome.reason.startswith("UEFI shell: Shell>"), outcome
    assert any("UEFI Interactive Shell" in line for line in outcome.console), outcome


# ten checks of at most 150 s (a TCG boot takes 40-85 s), and the guest converted once per
# machine (at most 1800 s)
@pytest.mark.timeout(10 * 150 + 1800 + 120)
def test_the_demo_guest_boots_to_its_login_prompt_ten_times_in_a_row(
    libvirt_uri: str, converted_guest: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "guest.qcow2"
    shutil.copyfile(converted_guest, disk)  # each check boots an overlay of it
    outcomes = [_boot(libvirt_uri, disk, "qcow2", timeout=150, memory_mb=1024)
                for _ in range(10)]
    failed = [outcome for outcome in outcomes if not outcome.booted]
    assert not failed, failed
    assert all("debian-vmware login:" in outcome.reason for outcome in outcomes), outcomes
