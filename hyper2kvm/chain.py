"""Every file a disk makes qemu read, confined to the roots it may read from.

qemu follows a disk's backing file (qcow2, vmdk, vhdx, vpc), a qcow2's external data file
and a VMDK descriptor's extents wherever they point; run as root on a disk someone else
handed in, it would read any file of the host into the converted image. Before a disk is
converted or attached, each of those references is resolved (`..` and symlinks) and
refused unless it stays inside the allowed roots. `qemu-img info` opens an image without
its backing file, so walking the chain never reads a file before it is confined."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from core.errors import InvalidRequest, PathNotAllowed
from core.paths import confine_any
from hyper2kvm import qemu_img
from hyper2kvm.detect import detect_format
from hyper2kvm.qemu_img import DiskSource
from hyper2kvm.vmdk import parse_vmdk

MAX_DEPTH = 64  # a longer chain is a loop or an attack
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _referenced_path(reference: str, *, relative_to: Path, what: str) -> Path:
    """A file name as qemu stores it, as a path; protocols and json: specs refused."""
    if _PROTOCOL.match(reference):
        raise PathNotAllowed(f"{what} {reference!r} is not a plain file name")
    path = Path(reference)
    return path if path.is_absolute() else relative_to / path


def _data_file(info: dict[str, Any]) -> str | None:
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    name = data.get("data-file")
    return str(name) if name else None


def confine_chain(source: DiskSource, roots: list[Path]) -> list[Path]:
    """Refuse `source` unless every file it reads (itself, extents, data file, backing
    chain) resolves inside `roots`; returns the chain's files, `source` first. A disk
    stored inside another file (an OVA member) must stand alone: no backing file."""
    source_path = confine_any(source.path.absolute(), roots, what="disk")
    chain = [source_path]
    current = DiskSource(source_path, source.format, source.offset, source.size)
    for _ in range(MAX_DEPTH):
        label = current.path.name
        if current.format == "vmdk" and not current.offset and current.size is None:
            # a descriptor's extents: inside its own folder (vmdk.extent_path) and roots
            for extent in parse_vmdk(current.path).extents:
                if extent.file and extent.kind != "ZERO":
                    chain.append(confine_any(current.path.parent / extent.file, roots,
                                             what=f"extent of {label}"))
        info = qemu_img.info(current)
        data_file = _data_file(info)
        if data_file:
            chain.append(confine_any(
                _referenced_path(data_file, relative_to=current.path.parent,
                                 what=f"data file of {label}"),
                roots, what=f"data file of {label}"))
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            return chain
        if current.offset or current.size is not None:
            raise InvalidRequest(f"{label}: a disk inside an archive may not have a backing "
                                 f"file (it names {backing!r})")
        parent = confine_any(
            _referenced_path(str(backing), relative_to=current.path.parent,
                             what=f"backing file of {label}"),
            roots, what=f"backing file of {label}")
        if parent in chain:
            raise InvalidRequest(f"{label}: its backing chain loops back to {parent.name}")
        if not parent.is_file():
            raise InvalidRequest(f"{label}: backing file {backing!r} does not exist")
        chain.append(parent)
        fmt = info.get("backing-filename-format") or detect_format(parent)
        current = DiskSource(parent, str(fmt))
    raise InvalidRequest(f"{source.path.name}: backing chain longer than {MAX_DEPTH} files")

