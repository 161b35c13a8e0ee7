"""The register step: a libvirt domain from the source's hardware and the converted disks."""

from __future__ import annotations

from dataclasses import replace as replace_fields

from prefect import get_run_logger, task

from core.config import Hyper2kvmConfig
from core.models import ConvertedDisk, VMInfo
from core.paths import safe_name
from hyper2kvm.cpu import domain_type_and_cpu
from hyper2kvm.domain import DomainDisk, NetworkMap, domain_xml
from hyper2kvm.registration import Registered, define_domain, place_in_pool
from tasks.progress import JobProgress


def domain_definition(vm: VMInfo, disks: list[ConvertedDisk], settings: Hyper2kvmConfig, *,
                      name: str, compat: bool | None) -> str:
    """The domain XML for `vm` on `disks`, as this host runs it (domain type, CPU,
    networks, firmware)."""
    domain_type, cpu = domain_type_and_cpu(settings.domain_type, settings.libvirt_uri)
    return domain_xml(
        vm,
        [DomainDisk(d.path, d.format) for d in disks],
        name=name,
        domain_type=domain_type,
        cpu=cpu,
        networks=NetworkMap(default=settings.network, by_source=settings.network_map),
        compat=compat,
        uefi=settings.uefi_firmware,
    )


@task(name="register", persist_result=True)
def register_domain(
    vm: VMInfo,
    disks: list[ConvertedDisk],
    settings: Hyper2kvmConfig,
    *,
    autostart: bool,
    replace: bool,
    compat: bool | None = None,
) -> Registered:
    """Define the domain on `settings.libvirt_uri`, named after the VM."""
    progress = JobProgress.for_current_run(vm.name)
    progress.start("register", 0)
    name = safe_name(vm.name)
    xml = domain_definition(vm, disks, settings, name=name, compat=compat)
    registered = define_domain(settings.libvirt_uri, xml, name=name, autostart=autostart,
                               replace=replace)
    if settings.storage_pools and disks:
        pool, volumes = place_in_pool(settings.libvirt_uri, disks[0].path.parent,
                                      f"hypersdk-{name}")
        registered = replace_fields(registered, pool=pool, volumes=tuple(volumes))
    progress.finish()
    get_run_logger().info("defined libvirt domain %s (%s) on %s%s", registered.name,
                          registered.uuid, registered.uri,
                          f"; disks in pool {registered.pool}" if registered.pool else "")
    return registered
