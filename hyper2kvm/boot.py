"""The boot check: does the migrated VM come up on KVM?

The registered domain is booted once as a transient copy of itself: the same hardware
(CPU, firmware, buses, NIC models), its disks behind throwaway copy-on-write overlays
(the migrated disks are only read), its NICs on user-mode networking (the source VM may
still run with the same MACs on a real network). Its serial console, and the guest
agent where the guest has one, are watched until the guest shows it is up: a login
prompt, or the job's own pattern. Known dead ends (no root file system, a kernel
panic, emergency mode, no bootable disk, OVMF's UEFI shell) end the wait early.

A getty's prompt is found even when other output follows it on the same line: a guest
converted by virt-v2v runs its firstboot scripts (apt-get install qemu-guest-agent,
printed on the console) while getty starts, and a prompt followed by "firstboot.sh[338]:
Ign:1 http://deb.debian.org ..." was missed until the timeout (the demo's 600 s failure).
A console that stays quiet is sent Enter now and then, so that a getty prints its prompt
again; a console stream that ends while the guest runs is opened again.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from core.errors import RegistrationError
from hyper2kvm import qemu_img
from hyper2kvm.console import ConsoleWatch
from hyper2kvm.registration import connect

# "<hostname> login: " at the start of a line, whatever follows it there
LOGIN_PROMPT = re.compile(r"(?m)^(?!Last )\S+ login: ?")
DEAD_ENDS = {
    "no root file system": re.compile(
        r"Gave up waiting for root|ALERT! .* does not exist|Unable to mount root fs|"
        r"Could not boot|Warning: /dev/\S+ does not exist"),
    # the whole line (it may arrive in pieces): its end often names the cause
    "kernel panic": re.compile(r"Kernel panic - not syncing[^\n]*(?=\n)"),
    "emergency mode": re.compile(r"You are in emergency mode|Entering emergency mode"),
    "initramfs shell": re.compile(r"\(initramfs\) ?$", re.MULTILINE),
    "no bootable disk": re.compile(
        r"No bootable device|not a bootable disk|No bootable option or device was found"),
    # OVMF starts its shell once every boot option failed (and startup.nsh had its chance)
    "UEFI shell": re.compile(r"(?m)^Shell> ?$"),
}
# what firmware prints as it hands over to the boot sector or loader (SeaBIOS, OVMF)
_FIRMWARE_HANDOFF = re.compile(r"^Booting from |^BdsDxe: starting ")
_AGENT_POLL_SECONDS = 3.0
# press Enter (a getty shows its prompt again) after this much console silence, and at
# least this often on a console that keeps printing (a prompt garbled by other output)
NUDGE_AFTER_SECONDS = 15.0
NUDGE_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class BootOutcome:
    booted: bool
    reason: str
    seconds: float
    console: list[str] = field(default_factory=list)


def verify_boot(uri: str, name: str, *, timeout: float, pattern: str | None = None,
                keep_lines: int = 30) -> BootOutcome:
    """Boot a throwaway copy of domain `name` and watch it for up to `timeout` s."""
    with connect(uri) as conn:
        try:
            defined = conn.lookupByName(name)
            source = ET.fromstring(defined.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError as exc:
            raise RegistrationError(f"boot check: no domain {name!r}: {exc}") from None
    return boot_definition(uri, source, name=name, timeout=timeout, pattern=pattern,
                           keep_lines=keep_lines)


def boot_definition(uri: str, source: ET.Element, *, name: str, timeout: float,
                    pattern: str | None = None, keep_lines: int = 30) -> BootOutcome:
    """Boot a throwaway copy of the domain `source` defines (named after `name`), its
    disks behind overlays, and watch it for up to `timeout` s."""
    disks = [(disk_source, driver) for element in source.iterfind("devices/disk[@device='disk']")
             if (disk_source := element.find("source")) is not None and disk_source.get("file")
             and (driver := element.find("driver")) is not None]
    if not disks:
        return BootOutcome(False, "the domain has no disk to boot from", 0.0)
    stop_boot_check(uri, name)  # one a killed process left running
    # a partial name: whoever cleans up after a killed job removes it (core.files)
    work = Path(disks[0][0].get("file", "")).parent / f".boot-check-{uuid.uuid4().hex[:8]}.partial"
    work.mkdir(mode=0o711)  # the qemu user opens the overlays inside
    try:
        for index, (disk_source, driver) in enumerate(disks):
            overlay = work / f"disk{index}.qcow2"
            qemu_img.create_overlay(overlay, Path(disk_source.get("file", "")),
                                    driver.get("type", "raw"))
            disk_source.set("file", str(overlay))
            driver.set("type", "qcow2")
        xml = _throwaway(source, work, _throwaway_name(name))
        return _boot_and_watch(uri, xml, timeout=timeout, pattern=pattern, keep=keep_lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _throwaway_name(name: str) -> str:
    return f"{name}-boot-check"


def stop_boot_check(uri: str, name: str) -> bool:
    """Stop the throwaway copy of domain `name` if one runs (its process was killed
    mid-check); True if there was one."""
    with connect(uri) as conn:
        try:
            conn.lookupByName(_throwaway_name(name)).destroy()
        except libvirt.libvirtError:
            return False
    return True


def _throwaway(domain: ET.Element, work: Path, name: str) -> str:
    """The domain's definition as a transient copy: new name and no UUID, NVRAM and
    console in `work`, NICs on user-mode networking without the source's MACs, BIOS
    messages on the serial console too."""
    name_element = domain.find("name")
    assert name_element is not None
    name_element.text = name
    for element in domain.findall("uuid"):
        domain.remove(element)
    os_element = domain.find("os")
    if os_element is not None:
        nvram = os_element.find("nvram")
        if nvram is not None or os_element.get("firmware") == "efi":
            if nvram is None:
                nvram = ET.SubElement(os_element, "nvram")
            nvram.text = str(work / "VARS.fd")  # a fresh one, from the domain's template
            nvram.attrib.pop("format", None)
        if os_element.find("bios") is None:
            ET.SubElement(os_element, "bios", useserial="yes")
    devices = domain.find("devices")
    assert devices is not None
    for interface in devices.findall("interface"):
        model = interface.find("model")
        devices.remove(interface)
        user = ET.SubElement(devices, "interface", type="user")
        if model is not None:
            user.append(model)
    for channel in devices.findall("channel"):
        for path in channel.findall("source"):
            channel.remove(path)  # libvirt picks a socket per (transient) domain
    return ET.tostring(domain, encoding="unicode")


def _boot_and_watch(uri: str, xml: str, *, timeout: float, pattern: str | None,
                    keep: int) -> BootOutcome:
    up = re.compile(pattern, re.MULTILINE) if pattern else LOGIN_PROMPT
    started = time.monotonic()
    with connect(uri) as conn:
        try:
            domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as exc:
            return BootOutcome(False, f"the domain does not start: {exc}", 0.0)
        console: ConsoleWatch | None = None
        try:
            console = ConsoleWatch(uri, domain.name(), keep=keep)
            domain.resume()
            watched = {"up": up, **DEAD_ENDS}
            nudged = time.monotonic()
            while True:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    return BootOutcome(False, _silence(console, timeout, pattern),
                                       _since(started), console.last_lines())
                now = time.monotonic()
                if (now - max(console.last_output, nudged) >= NUDGE_AFTER_SECONDS
                        or now - nudged >= NUDGE_EVERY_SECONDS):
                    console.send("\r")
                    nudged = now
                found = console.wait_for(watched, min(remaining, _AGENT_POLL_SECONDS))
                if found == "up":
                    return BootOutcome(True, f"console showed {console.match(up)!r}",
                                       _since(started), console.last_lines())
                if found is not None:
                    return BootOutcome(False, f"{found}: {console.match(watched[found])}",
                                       _since(started), console.last_lines())
                if not domain.isActive():
                    return BootOutcome(False, "the guest stopped by itself", _since(started),
                                       console.last_lines())
                if _agent_answers(domain):
                    return BootOutcome(True, "the guest agent connected", _since(started),
                                       console.last_lines())
        except libvirt.libvirtError as exc:
            lines = console.last_lines() if console else []
            return BootOutcome(False, f"the domain failed: {exc}", _since(started), lines)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()  # first: that ends the console's stream
            if console is not None:
                console.close()


def _agent_answers(domain: libvirt.virDomain) -> bool:
    """The guest agent opened its channel (libvirt tracks the port's state): the guest's
    user space is up. Read from the live XML: an agent command would block while the
    guest has no agent."""
    live = ET.fromstring(domain.XMLDesc(0))
    return any(target.get("state") == "connected" for target in
               live.iterfind("devices/channel/target[@name='org.qemu.guest_agent.0']"))


def _silence(console: ConsoleWatch, timeout: float, pattern: str | None) -> str:
    """Why the wait ran out, in words that tell "the guest hung at X" from "we saw
    nothing"."""
    lines = console.last_lines()
    if not lines:
        said = "the console showed nothing (does the guest use a serial console?)"
    elif _FIRMWARE_HANDOFF.search(lines[-1]):
        said = f"the console showed nothing after the firmware's {lines[-1]!r}"
    else:
        wanted = f"no match for {pattern!r}" if pattern else "no login prompt"
        said = f"{wanted} and no guest agent; the console's last line: {lines[-1]!r}"
    if console.reopened:
        said += f" (its console stream was opened again {console.reopened} time(s))"
    return f"not up within {timeout:g} s: {said}"


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)
