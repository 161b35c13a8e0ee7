"""The converter's own endpoints: convert, parse a VMDK, import a disk into libvirt."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, JobsDep, SettingsDep
from api.schemas import Body, JobSubmitted
from core.config import Config
from core.errors import InvalidRequest
from core.models import AbsolutePath, ConvertRequest
from core.paths import confine_any
from flows.convert_vm import output_folder, source_file
from hyper2kvm import ova
from hyper2kvm.importing import import_disk
from hyper2kvm.vmdk import parse_vmdk

router = APIRouter(tags=["convert"], dependencies=[ApiKeyDep])


class ImportRequest(Body):
    vm_name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    disk_path: AbsolutePath
    memory_mb: int = Field(default=2048, ge=64, le=4 * 1024 * 1024)
    vcpus: int = Field(default=2, ge=1, le=512)
    network: str = "default"
    autostart: bool = False
    firmware: str = Field(default="bios", pattern="^(bios|efi)$")
    replace: bool = False
    compat_mode: bool = False  # SATA disk and e1000 NIC, for guests without virtio drivers


def _parse(settings: Config, path: str) -> dict[str, Any]:
    file = confine_any(path, settings.source_roots(), what="path")
    if not file.is_file():
        raise InvalidRequest(f"{path} is not a file")
    if file.suffix == ".ova":
        members = ova.read_members(file)
        disks = {name: parse_vmdk(file, offset=m.offset, size=m.size).as_dict()
                 for name, m in members.items() if name.endswith(".vmdk")}
        return {"path": str(file), "ova": True, "disks": disks}
    return {"path": str(file), **parse_vmdk(file).as_dict()}


def _import(settings: Config, body: ImportRequest) -> dict[str, Any]:
    roots = settings.source_roots()
    disk = confine_any(body.disk_path, roots, what="disk_path")
    h2k = settings.hyper2kvm
    registered, fmt = import_disk(
        h2k.libvirt_uri, disk, roots=roots, name=body.vm_name, memory_mb=body.memory_mb,
        vcpus=body.vcpus,
        network=body.network, firmware=body.firmware,  # type: ignore[arg-type]
        autostart=body.autostart, replace=body.replace, compat=body.compat_mode,
        domain_type=h2k.domain_type)
    return {"vm_name": registered.name, "uuid": registered.uuid, "uri": registered.uri,
            "autostart": registered.autostart, "disk_path": str(disk), "format": fmt}


def _validate_conversion(settings: Config, body: ConvertRequest) -> None:
    output_folder(body, source_file(body, settings.source_roots()).stem,
                  settings.hyper2kvm.output_dir)


@router.post("/convert", response_model=JobSubmitted)
async def convert_vm(body: ConvertRequest, settings: SettingsDep, jobs: JobsDep) -> JobSubmitted:
    """Start a `convert-vm` flow run; follow it with the /jobs endpoints."""
    await run_in_threadpool(_validate_conversion, settings, body)
    return await jobs.submit_conversion(body)


@router.get("/parse-vmdk")
async def parse_vmdk_metadata(settings: SettingsDep,
                              path: Annotated[AbsolutePath, Query(min_length=1)]) -> dict[str, Any]:
    """The VMDK's descriptor, sparse header and extents (every VMDK of an OVA)."""
    return await run_in_threadpool(_parse, settings, path)


@router.post("/import-to-kvm")
async def import_to_kvm(body: ImportRequest, settings: SettingsDep) -> dict[str, Any]:
    """Define a libvirt domain around an existing qcow2 or raw disk."""
    return await run_in_threadpool(_import, settings, body)
