"""How a domain runs on this host: KVM or TCG, and the CPU it gets.

libvirt's domain capabilities say what the hypervisor supports; that is not enough on
nested hosts. KVM on AMD may advertise arch-capabilities (an Intel MSR) and then refuse
to set it ("failed to set MSR 0x10a"), and some nested KVM starts a domain whose kernel
then never gets past its first instructions. So each CPU candidate is started for real
in a tiny transient domain (a refused MSR turns its feature off and the candidate is
tried again), and KVM counts as usable only when the host's own Linux kernel boots
under it to its first panic (no root file system) within seconds. The verdict is kept
per process, and on disk per host boot (probing a bad host costs ~20 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import libvirt

from core.errors import RegistrationError
from core.files import write_private
from hyper2kvm.console import ConsoleWatch
from hyper2kvm.registration import connect, version

DomainType = Literal["kvm", "qemu"]
CpuMode = Literal["host-passthrough", "host-model", "maximum", "default"]
T = TypeVar("T")

# MSRs that nested hypervisors are known to refuse, and the CPU feature that makes
# QEMU set them
_FEATURE_OF_MSR = {0x10A: "arch-capabilities", 0x122: "tsx-ctrl"}
_REFUSED_MSR = re.compile(r"failed to set MSR (0x[0-9a-fA-F]+)")
_PROBE_SETTLE_SECONDS = 0.3  # a vCPU that cannot run kills QEMU within this
_KERNEL_BOOT_SECONDS = 20.0  # a bare kernel reaches its panic in ~1 s with KVM, ~2 s TCG
_KERNEL_PANIC = re.compile(r"Kernel panic - not syncing")


@dataclass(frozen=True)
class CpuChoice:
    """`mode` as libvirt names it; `default` means no <cpu> element (QEMU's baseline)."""

    mode: CpuMode
    disabled: tuple[str, ...] = ()

    def element(self) -> ET.Element | None:
        if self.mode == "default":
            return None
        cpu = ET.Element("cpu", mode=self.mode)
        if self.mode == "host-model":
            cpu.set("check", "partial")
        for name in self.disabled:
            ET.SubElement(cpu, "feature", policy="disable", name=name)
        return cpu

    def describe(self) -> str:
        off = f" without {', '.join(self.disabled)}" if self.disabled else ""
        return f"{self.mode}{off}"


def usable_domain_type(uri: str) -> DomainType:
    """kvm where libvirt can use it (its qemu user opens /dev/kvm) and a kernel boots
    under it; qemu (TCG) otherwise."""
    return _remembered(uri, "type", lambda: _probe_domain_type(uri),
                       load=lambda value: value if value in ("kvm", "qemu") else None,
                       dump=lambda verdict: verdict)


def _remembered(uri: str, name: str, probe: Callable[[], T], *,
                load: Callable[[Any], T | None], dump: Callable[[T], Any]) -> T:
    """`probe()`'s answer about `uri`, kept in the cache file for this host boot and
    libvirt version."""
    boot = _boot_id()
    key = f"{name}|{uri}|{version(uri)}|{boot}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if key in known and (found := load(known[key])) is not None:
        return found
    answer = probe()
    known = {k: v for k, v in known.items() if k.endswith(f"|{boot}")}
    known[key] = dump(answer)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_private(cache, json.dumps(known))
    return answer


def _probe_domain_type(uri: str) -> DomainType:
    try:
        cpu = choose_cpu(uri, "kvm")  # RegistrationError where libvirt has no KVM at all
    except RegistrationError:
        return "qemu"
    return "qemu" if kernel_boots(uri, "kvm", cpu) is False else "kvm"


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hypersdk" / "domain-type.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _host_kernel() -> Path | None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda path: path.stat().st_mtime)
    readable = [kernel for kernel in kernels if os.access(kernel, os.R_OK)]
    return readable[-1] if readable else None


def kernel_boots(uri: str, domain_type: DomainType, cpu: CpuChoice) -> bool | None:
    """Boot the host's kernel (no disk, no initrd) in a transient domain: does it reach
    its panic? None where the host has no kernel to try."""
    kernel = _host_kernel()
    if kernel is None:
        return None
    with tempfile.TemporaryDirectory(prefix="hypersdk-probe-") as work:
        folder = Path(work)
        folder.chmod(0o711)  # the qemu user reads the kernel's copy, not /boot's file
        copy = folder / "vmlinuz"
        shutil.copyfile(kernel, copy)
        copy.chmod(0o644)
        domain = _probe_domain(domain_type, cpu)
        os_element = domain.find("os")
        assert os_element is not None
        ET.SubElement(os_element, "kernel").text = str(copy)
        ET.SubElement(os_element, "cmdline").text = "console=ttyS0 panic=0 loglevel=4"
        devices = domain.find("devices")
        assert devices is not None
        ET.SubElement(ET.SubElement(devices, "serial", type="pty"), "target", port="0")
        with connect(uri) as conn:
            try:
                probe = conn.createXML(ET.tostring(domain, encoding="unicode"),
                                       libvirt.VIR_DOMAIN_START_PAUSED)
            except libvirt.libvirtError:
                return False
            console: ConsoleWatch | None = None
            try:
                console = ConsoleWatch(uri, probe.name())
                probe.resume()
                found = console.wait_for({"panic": _KERNEL_PANIC}, _KERNEL_BOOT_SECONDS)
                return found is not None
            except libvirt.libvirtError:
                return False
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    probe.destroy()  # first: that ends the console's stream
                if console is not None:
                    console.close()


def pick_domain_type(requested: str, uri: str) -> DomainType:
    if requested in ("kvm", "qemu"):
        return requested  # type: ignore[return-value]
    return usable_domain_type(uri)


def domain_type_and_cpu(requested: str, uri: str) -> tuple[DomainType, CpuChoice]:
    """What a new domain on `uri` runs as: `requested` (auto, kvm or qemu), and its CPU."""
    domain_type = pick_domain_type(requested, uri)
    return domain_type, choose_cpu(uri, domain_type)


def supported_modes(uri: str, domain_type: DomainType) -> set[str]:
    with connect(uri) as conn:
        try:
            caps = conn.getDomainCapabilities(None, "x86_64", "q35", domain_type, 0)
        except libvirt.libvirtError as exc:
            raise RegistrationError(f"libvirt cannot run {domain_type} domains: {exc}") from None
    return {mode.get("name", "") for mode in ET.fromstring(caps).iterfind("cpu/mode")
            if mode.get("supported") == "yes"}


@cache
def choose_cpu(uri: str, domain_type: DomainType) -> CpuChoice:
    """The first candidate that starts: host-passthrough, then host-model, then QEMU's
    baseline with KVM; QEMU's `max` CPU, then its baseline, with TCG."""
    return _remembered(uri, f"cpu-{domain_type}", lambda: _probe_cpu(uri, domain_type),
                       load=_cpu_from_json, dump=lambda choice: [choice.mode,
                                                                 list(choice.disabled)])


def _cpu_from_json(value: Any) -> CpuChoice | None:
    try:
        mode, disabled = value
        features = tuple(str(name) for name in disabled)
    except (TypeError, ValueError):
        return None
    if mode not in get_args(CpuMode):
        return None
    return CpuChoice(mode, features)


def _probe_cpu(uri: str, domain_type: DomainType) -> CpuChoice:
    supported = supported_modes(uri, domain_type)
    preferred = ("host-passthrough", "host-model") if domain_type == "kvm" else ("maximum",)
    candidates = [CpuChoice(mode) for mode in preferred if mode in supported]  # type: ignore[arg-type]
    candidates.append(CpuChoice("default"))
    reasons: list[str] = []
    for candidate in candidates:
        while True:
            refused = _refused_by_host(uri, domain_type, candidate)
            if refused is None:
                return candidate
            feature = _feature_for(refused)
            if feature is None or feature in candidate.disabled:
                reasons.append(f"{candidate.describe()}: {refused}")
                break
            candidate = CpuChoice(candidate.mode, (*candidate.disabled, feature))
    raise RegistrationError(f"no CPU definition starts on this host ({domain_type}): "
                            + "; ".join(reasons))


def _feature_for(error: str) -> str | None:
    match = _REFUSED_MSR.search(error)
    return _FEATURE_OF_MSR.get(int(match.group(1), 16)) if match else None


def _refused_by_host(uri: str, domain_type: DomainType, choice: CpuChoice) -> str | None:
    """Start a diskless transient domain with `choice`; None if it runs, else why not."""
    domain = _probe_domain(domain_type, choice)
    with connect(uri) as conn:
        try:
            probe = conn.createXML(ET.tostring(domain, encoding="unicode"), 0)
        except libvirt.libvirtError as exc:
            return str(exc)
        try:
            time.sleep(_PROBE_SETTLE_SECONDS)
            if not probe.isActive():
                return "the domain stopped at once"
            return None
        except libvirt.libvirtError as exc:
            return str(exc)
        finally:
            with contextlib.suppress(libvirt.libvirtError):  # it may have stopped
                probe.destroy()


def _probe_domain(domain_type: DomainType, choice: CpuChoice) -> ET.Element:
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = f"hypersdk-probe-{uuid.uuid4().hex[:12]}"
    ET.SubElement(domain, "memory", unit="MiB").text = "128"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    cpu = choice.element()
    if cpu is not None:
        domain.append(cpu)
    ET.SubElement(domain, "devices")
    return domain
