"""Guest conversion: virt-v2v-in-place on the converted disks (never the source).

It installs virtio drivers into the initramfs (or Windows, from virtio-win), fixes
fstab's and the boot loader's device names, and removes VMware tools and agents of
other hypervisors. It runs in a libguestfs appliance: with KVM where this host runs it
(with the CPU features a nested host refuses turned off, hyper2kvm.cpu), with TCG
where not. Its progress lines go to `on_line`; its full debug output to a log file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from core.errors import ConversionError, GuestNotConvertible
from core.models import ConvertedDisk, GuestReport, VMInfo
from core.process import group_dying_with_parent, terminate_with_parent
from hyper2kvm.cpu import CpuChoice, choose_cpu, usable_domain_type
from hyper2kvm.domain import disk_target

TOOL = "virt-v2v-in-place"
QEMU = "/usr/bin/qemu-system-x86_64"

# virt-v2v's numbered progress lines ("[  12.3] Inspecting the source") and how far
# through the conversion each one is
_STAGES = (
    ("Setting up the source", 0.0),
    ("Opening the source", 0.05),
    ("Inspecting the source", 0.3),
    ("Checking for sufficient free disk space", 0.4),
    ("Converting", 0.45),
    ("Mapping filesystem data", 0.9),
    ("Closing the overlay", 0.95),
    ("Finishing off", 0.98),
)
# from the start to "Inspecting the source": ~15 s under TCG here. A libguestfs appliance
# whose kernel hangs under TCG (seen in CI: stuck in PCI enumeration for 14 min) never gets
# there; it is killed and started again, once
APPLIANCE_UP_SECONDS = 300.0
LAUNCH_ATTEMPTS = 2
_PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\d\]\s+(?P<text>.+)$")
# virt-v2v's reasons for a guest it cannot convert (no OS, or one it does not know): the
# disks are untouched, unlike a failure while converting
_NOT_CONVERTIBLE = re.compile(
    r"inspection could not detect the source guest|no root device found|"
    r"multi-boot operating systems are not supported|unable to convert this guest type|"
    r"virt-v2v is unable to convert|not a supported guest|libguestfs thinks this is not a guest")


def available() -> bool:
    return shutil.which(TOOL) is not None


def accelerator(uri: str) -> tuple[Literal["kvm", "tcg"], CpuChoice | None]:
    """How the libguestfs appliance runs here: KVM with the host's CPU where libvirt's
    probe found `-cpu host` (maybe minus some features) runs; TCG otherwise."""
    if usable_domain_type(uri) != "kvm":
        return "tcg", None
    choice = choose_cpu(uri, "kvm")
    if choice.mode != "host-passthrough":
        return "tcg", None
    return "kvm", choice


def _qemu_wrapper(folder: Path, disabled: tuple[str, ...]) -> Path:
    """libguestfs runs QEMU with `-cpu max,la57=off` (older ones with `-cpu host`); this
    wrapper (LIBGUESTFS_HV) runs it with the host's CPU minus the features the host
    refuses, the CPU the probe found to start (hyper2kvm.cpu)."""
    features = "".join(f",{name}=off" for name in disabled)
    script = folder / "qemu-system-x86_64"
    script.write_text(
        "#!/bin/sh\n"
        "prev=\n"
        "for arg; do\n"
        "  shift\n"
        '  if [ "$prev" = -cpu ]; then\n'
        f'    case "$arg" in host*|max*) arg="host{features}";; esac\n'
        "  fi\n"
        '  set -- "$@" "$arg"\n'
        '  prev=$arg\n'
        "done\n"
        f'exec {QEMU} "$@"\n'
    )
    script.chmod(0o700)
    return script


def _source_xml(vm: VMInfo, disks: list[ConvertedDisk]) -> str:
    """The converted guest as virt-v2v's `-i libvirtxml` input: its disks and firmware."""
    domain = ET.Element("domain", type="kvm")
    ET.SubElement(domain, "name").text = vm.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(vm.memory_mb)
    ET.SubElement(domain, "vcpu").text = str(vm.cpus)
    os_element = ET.SubElement(domain, "os")
    if vm.firmware == "efi":
        os_element.set("firmware", "efi")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    for index, disk in enumerate(disks):
        element = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(element, "driver", name="qemu", type=disk.format)
        ET.SubElement(element, "source", file=str(disk.path))
        ET.SubElement(element, "target", dev=disk_target(index, "sd"), bus="scsi")
    return ET.tostring(domain, encoding="unicode")


def convert_guest(
    vm: VMInfo,
    disks: list[ConvertedDisk],
    *,
    uri: str,
    log_file: Path,
    timeout: float,
    virtio_win: Path | None = None,
    on_line: Callable[[str], None] = lambda _line: None,
    on_stage: Callable[[str, float], None] = lambda _text, _fraction: None,
) -> GuestReport:
    """Convert the guest on `disks` in place; raise ConversionError with virt-v2v's reason
    when it fails or runs longer than `timeout` seconds."""
    if not available():
        raise ConversionError(f"{TOOL} is not installed (Debian: apt install virt-v2v)")
    if not disks:
        raise ConversionError("the VM has no disks to convert")
    mode, cpu = accelerator(uri)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hypersdk-v2v-") as work:
        folder = Path(work)
        source = folder / "guest.xml"
        source.write_text(_source_xml(vm, disks))
        # TMPDIR: the overlays and sockets go with the run; the appliance itself is
        # built once per machine into LIBGUESTFS_CACHEDIR (/var/tmp by default)
        env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "TMPDIR": work}
        if mode == "tcg":
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        elif cpu is not None and cpu.disabled:
            env["LIBGUESTFS_HV"] = str(_qemu_wrapper(folder, cpu.disabled))
        if virtio_win is not None:
            env["VIRTIO_WIN"] = str(virtio_win)
        command = [TOOL, "-v", "-i", "libvirtxml", str(source)]
        log_file.write_text("")  # this conversion's log; each attempt adds to it
        for attempt in range(1, LAUNCH_ATTEMPTS + 1):
            left = timeout - (time.monotonic() - started)
            lines, returncode, hung = _run(
                command, env=env, log_file=log_file, timeout=left,
                launch_timeout=APPLIANCE_UP_SECONDS if left > APPLIANCE_UP_SECONDS else None,
                on_line=on_line, on_stage=on_stage)
            if not hung:
                break
            # nothing is written before the inspection: starting again is safe
            on_line(f"the libguestfs appliance did not come up within "
                    f"{APPLIANCE_UP_SECONDS:g} s (attempt {attempt} of {LAUNCH_ATTEMPTS})")
        else:
            raise ConversionError(f"{TOOL}: the libguestfs appliance did not come up within "
                                  f"{APPLIANCE_UP_SECONDS:g} s, {LAUNCH_ATTEMPTS} times")
    if returncode != 0:
        reason = failure(lines, returncode, timeout, log=log_file.read_text(errors="replace"))
        if returncode is not None and _NOT_CONVERTIBLE.search(reason):
            raise GuestNotConvertible(reason)
        raise ConversionError(reason)
    report = parse_report(log_file.read_text(errors="replace"), lines)
    return report.model_copy(update={"accelerator": mode,
                                     "seconds": round(time.monotonic() - started, 1)})


def _run(
    command: list[str],
    *,
    env: dict[str, str],
    log_file: Path,
    timeout: float,
    launch_timeout: float | None,
    on_line: Callable[[str], None],
    on_stage: Callable[[str, float], None],
) -> tuple[list[str], int | None, bool]:
    """Run `command` in its own process group (killed whole on timeout, and when we die);
    every line to `log_file`, virt-v2v's own lines (not libguestfs's debug) to `on_line`.
    Returns those lines, the exit code (None when killed) and whether it was killed
    because the appliance did not come up (no inspection within `launch_timeout`, if
    given)."""
    messages: list[str] = []
    timed_out = threading.Event()
    inspecting = threading.Event()
    hung = threading.Event()
    with log_file.open("a") as log:
        # its own process group, killed whole on timeout, at the end, and when we die
        # (virt-v2v leaves its qemu-nbd running when it is killed)
        process = subprocess.Popen(
            group_dying_with_parent(command), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True, preexec_fn=terminate_with_parent)

        def expire() -> None:
            timed_out.set()
            _kill_group(process)

        def launch_check() -> None:
            if not inspecting.is_set():
                hung.set()
                _kill_group(process)

        timer = threading.Timer(timeout, expire)
        timer.start()
        watchdog = threading.Timer(launch_timeout or 0, launch_check)
        if launch_timeout is not None:
            watchdog.start()
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                log.write(raw)
                line = raw.rstrip()
                progress = _PROGRESS_LINE.match(line)
                if progress:
                    text = progress.group("text")
                    if text.startswith("Inspecting the source"):
                        inspecting.set()
                    messages.append(text)
                    on_line(text)
                    for prefix, fraction in _STAGES:
                        if text.startswith(prefix):
                            on_stage(text, fraction)
                elif line.startswith((f"{TOOL}:", "virt-v2v:")):
                    messages.append(line)
                    on_line(line)
            returncode = process.wait()
        finally:
            timer.cancel()
            watchdog.cancel()
            _kill_group(process)  # the appliance and helpers it started
    killed = timed_out.is_set() or hung.is_set()
    return messages, None if killed else returncode, hung.is_set() and not timed_out.is_set()


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def failure(messages: list[str], returncode: int | None, timeout: float, *,
            log: str = "") -> str:
    """virt-v2v's own reason: its `error:` line (in its messages, else anywhere in its
    `log`: libguestfs's debug output on stderr may run into it mid-line), else its last
    words."""
    if returncode is None:
        return f"{TOOL} did not finish within {timeout:g} s and was stopped"
    errors = [line.split("error:", 1)[1].strip() for line in messages if "error:" in line]
    errors = errors or [found.strip() for found in _ERROR.findall(log)]
    if errors:
        return f"{TOOL} failed: {errors[-1]}"
    last = messages[-1] if messages else "no output"
    return f"{TOOL} exited with status {returncode}: {last}"


# searched anywhere in a line: libguestfs's debug output (stderr) may be cut into it
_ERROR = re.compile(rf"{re.escape(TOOL)}: error: (.*)")
_FACT = re.compile(r"\b(i_[a-z_]+|gcaps_[a-z_]+) = (.*)$")
_KERNEL = re.compile(r"\* (?:kernel|linux-image)\S* (?P<version>\S+) \((?P<arch>[^)]+)\)$")
_REMOVED = re.compile(r"^commandrvf: (?:dpkg --purge|rpm -e(?: --allmatches)?|"
                      r"(?:yum|dnf|zypper) -y remove|apt-get -y (?:remove|purge)) (?P<names>.+)$")
_DEVICE_MAP = re.compile(r"^\t(?P<old>[a-z]+)\t-> (?P<new>[a-z]+)$")
_INITRAMFS = re.compile(r"^commandrvf: \S*(?:update-initramfs|dracut|mkinitrd)\b.*?"
                        r"(?P<version>\d+\.\d+\.\d+\S*)")


def parse_report(log: str, messages: list[str]) -> GuestReport:
    """What virt-v2v's verbose log says about the guest (inspection `i_*` and guest
    capability `gcaps_*` facts, kernels, removed packages, rewritten device names)."""
    facts: dict[str, str] = {}
    kernels: list[str] = []
    removed: list[str] = []
    changes: list[str] = []
    device_map: list[str] = []
    for line in log.splitlines():
        fact = _FACT.search(line)
        if fact:
            facts.setdefault(fact.group(1), fact.group(2).strip())
            continue
        # virt-v2v lists the kernels ("* <package> <version> (<arch>)") twice: installed
        # ones, and those the boot loader offers; libguestfs's debug lines may come between
        if (kernel := _KERNEL.search(line)) is not None:
            kernels.append(kernel.group("version"))
        elif (gone := _REMOVED.match(line)) is not None:
            removed.extend(gone.group("names").split())
        elif (mapped := _DEVICE_MAP.match(line)) is not None:
            device_map.append(f"{mapped.group('old')} → {mapped.group('new')}")
        elif (rebuilt := _INITRAMFS.match(line)) is not None:
            changes.append(f"rebuilt the initramfs of kernel {rebuilt.group('version')}")
    if device_map:
        changes.insert(0, "device names in fstab and boot loader remapped: "
                          + ", ".join(dict.fromkeys(device_map)))
    if removed:
        changes.append("removed " + ", ".join(dict.fromkeys(removed)))
    warnings = [line.split("warning:", 1)[1].strip() for line in messages if "warning:" in line]
    notes = [line.split(":", 1)[1].strip() for line in messages
             if line.startswith(f"{TOOL}:") and "warning:" not in line and "error:" not in line
             and not line.startswith(f"{TOOL}: virt-v2v ")]
    major, minor = facts.get("i_major_version"), facts.get("i_minor_version")
    firmware = facts.get("i_firmware", "").lower()
    return GuestReport(
        os_type=facts.get("i_type") or None,
        distribution=facts.get("i_distro") or None,
        version=f"{major}.{minor}" if major and minor and minor != "0" else major,
        product=facts.get("i_product_name") or None,
        arch=facts.get("i_arch") or None,
        firmware="efi" if "uefi" in firmware else "bios" if "bios" in firmware else None,
        kernels=list(dict.fromkeys(kernels)),
        virtio=facts.get("gcaps_block_bus") == "virtio-blk",
        removed=list(dict.fromkeys(removed)),
        changes=[*changes, *notes],
        warnings=warnings,
    )
