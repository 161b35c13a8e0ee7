"""Defining converted VMs with libvirt."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import libvirt

from core.errors import DomainExists, RegistrationError
from hyper2kvm.access import check_qemu_reaches


@dataclass(frozen=True)
class Registered:
    name: str
    uuid: str
    uri: str
    autostart: bool
    pool: str | None = None
    volumes: tuple[str, ...] = ()


def _quiet(_context: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


@contextlib.contextmanager
def connect(uri: str) -> Iterator[libvirt.virConnect]:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise RegistrationError(f"cannot connect to libvirt at {uri}: {exc}") from None
    try:
        yield conn
    finally:
        conn.close()


@cache
def version(uri: str) -> str | None:
    try:
        with connect(uri) as conn:
            number = conn.getLibVersion()
    except RegistrationError:
        return None
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def domain_exists(uri: str, name: str) -> bool:
    with connect(uri) as conn:
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        return True


def name_taken(uri: str, name: str) -> str | None:
    """Why a new domain cannot be named `name` here (one of that name is defined), or
    None."""
    if not domain_exists(uri, name):
        return None
    return (f"a libvirt domain named {name!r} already exists on {uri}; set "
            "hyper2kvm_integration.replace_existing to replace it")


def still_defined(registered: Registered) -> str | None:
    """How the domain differs from the one `registered` names now (gone, or another
    domain of that name), or None."""
    with connect(registered.uri) as conn:
        try:
            uuid = conn.lookupByName(registered.name).UUIDString()
        except libvirt.libvirtError:
            return f"domain {registered.name!r} is no longer defined on {registered.uri}"
    if uuid != registered.uuid:
        return f"domain {registered.name!r} is another domain now ({uuid})"
    return None


def define_domain(uri: str, xml: str, *, name: str, autostart: bool, replace: bool) -> Registered:
    """Define (persistently) the domain; refuse to overwrite one of the same name unless
    `replace`, or a domain whose disks qemu could not reach (hyper2kvm.access)."""
    check_qemu_reaches(uri, [Path(source.get("file", "")) for source in
                             ElementTree.fromstring(xml).findall("devices/disk/source")
                             if source.get("file")])
    with connect(uri) as conn:
        try:
            existing = conn.lookupByName(name)
        except libvirt.libvirtError:
            existing = None
        if existing is not None:
            if not replace:
                raise DomainExists(f"a libvirt domain named {name!r} already exists")
            if existing.isActive():
                raise RegistrationError(f"domain {name!r} is running; stop it before replacing")
            existing.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        try:
            # validated against libvirt's schema: a definition it would only refuse at
            # start is refused now
            domain = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            if autostart:
                domain.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise RegistrationError(f"libvirt refused domain {name!r}: {exc}") from None
        return Registered(name=domain.name(), uuid=domain.UUIDString(), uri=uri,
                          autostart=bool(domain.autostart()))


def place_in_pool(uri: str, folder: Path, name: str) -> tuple[str, list[str]]:
    """Make `folder` a libvirt directory pool named `name` (defined, started, autostarted,
    refreshed), so its disks are volumes libvirt tools see; returns the pool's name and
    its volumes."""
    xml = (f"<pool type='dir'><name>{escape(name)}</name>"
           f"<target><path>{escape(str(folder))}</path></target></pool>")
    with connect(uri) as conn:
        try:
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError:
                pool = None
            if pool is not None and _pool_path(pool) != folder:
                # the VM was converted again into another folder (or its old folder is
                # gone): the pool follows it. Undefining a dir pool deletes no file.
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
                pool = None
            if pool is None:
                pool = conn.storagePoolDefineXML(xml, 0)
            if not pool.isActive():
                pool.create(0)
            pool.setAutostart(1)
            pool.refresh(0)
            return pool.name(), sorted(pool.listVolumes())
        except libvirt.libvirtError as exc:
            raise RegistrationError(f"storage pool {name!r} for {folder}: {exc}") from None


def _pool_path(pool: libvirt.virStoragePool) -> Path | None:
    path = ElementTree.fromstring(pool.XMLDesc(0)).findtext("target/path")
    return Path(path) if path else None


def start_problem(uri: str, name: str, *, paused: bool = True) -> str | None:
    """Start the defined domain as it is defined, then stop it: why it cannot start here
    (an inactive network, a missing bridge or firmware), or None. `paused`: QEMU starts
    with every device and its vCPUs never run, so the guest sends nothing on its networks
    and writes nothing to its disks: safe while the source VM still runs. A domain already
    running has started."""
    with connect(uri) as conn:
        try:
            domain = conn.lookupByName(name)
            if domain.isActive():
                return None
            domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        except libvirt.libvirtError as exc:
            return f"domain {name!r} as defined does not start on {uri}: {exc}"
        with contextlib.suppress(libvirt.libvirtError):  # it stopped of itself: it started
            domain.destroy()
        return None


def undefine_domain(uri: str, name: str) -> bool:
    """Remove a defined (inactive) domain; False if there was none."""
    with connect(uri) as conn:
        try:
            domain = conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        return True
