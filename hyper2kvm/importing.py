"""Importing an existing qcow2 or raw disk into libvirt as a new domain."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from core.errors import InvalidRequest
from core.models import NicInfo, VMInfo
from core.paths import safe_name
from hyper2kvm.chain import confine_chain
from hyper2kvm.cpu import domain_type_and_cpu
from hyper2kvm.detect import checked_format, claimed_format
from hyper2kvm.domain import DomainDisk, NetworkMap, domain_xml
from hyper2kvm.qemu_img import DiskSource
from hyper2kvm.registration import Registered, define_domain


def import_disk(
    uri: str,
    disk: Path,
    *,
    roots: list[Path] | None,
    name: str,
    memory_mb: int,
    vcpus: int,
    network: str,
    firmware: Literal["bios", "efi"] = "bios",
    autostart: bool = False,
    replace: bool = False,
    compat: bool = False,
    domain_type: str = "auto",
) -> tuple[Registered, str]:
    """Define a domain around `disk`; returns it and the disk's format. With `roots`, the
    disk and every file it reads (backing chain, data file) must be inside them: qemu
    would read them for the guest."""
    if not disk.is_file():
        raise InvalidRequest(f"{disk} is not a file")
    fmt = checked_format(disk, claimed=claimed_format(disk.name))
    if fmt not in ("qcow2", "raw"):
        raise InvalidRequest(f"{disk} is {fmt}; convert it to qcow2 or raw first")
    if roots is not None:
        confine_chain(DiskSource(disk, fmt), roots)
    domain_name = safe_name(name)
    vm = VMInfo(identifier=domain_name, name=domain_name, provider="local", cpus=vcpus,
                memory_mb=memory_mb, firmware=firmware, nics=[NicInfo(network=network)])
    kind, cpu = domain_type_and_cpu(domain_type, uri)
    xml = domain_xml(vm, [DomainDisk(disk, fmt)], name=domain_name,  # type: ignore[arg-type]
                     domain_type=kind, cpu=cpu,
                     networks=NetworkMap(default=network), compat=compat)
    registered = define_domain(uri, xml, name=domain_name, autostart=autostart, replace=replace)
    return registered, fmt
