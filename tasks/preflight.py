"""What stops a job, found by asking without changing anything: the same checks for a dry
run (`POST /jobs/submit` with `dry_run`) and for a real job's validate step, so that a job
fails before any snapshot is made. Each finding is a `Blocker` with a stable code."""

from __future__ import annotations

from pathlib import Path

from core.config import Config, Hyper2kvmConfig
from core.errors import ConfigError, InvalidRequest
from core.models import Blocker, DryRun, JobDefinition, VMInfo
from core.paths import safe_name
from hyper2kvm.cpu import pick_domain_type
from hyper2kvm.destination import (
    firmware_problem,
    free_space,
    network_problems,
    size_warnings,
    space_problem,
)
from hyper2kvm.domain import NetworkMap
from hyper2kvm.registration import name_taken
from providers import get_provider
from providers.base import Provider, copies_warm
from tasks.guest import guest_mode


def destination_findings(vm: VMInfo, h2k: Hyper2kvmConfig, *, strict: bool = False) -> tuple[
        list[Blocker], list[str]]:
    """The domain we would define can start here and its disks fit (networks, space,
    firmware); a VM larger than this host is a warning, or with `strict` a blocker."""
    uri = h2k.libvirt_uri
    blockers = network_problems(uri, vm, NetworkMap(default=h2k.network,
                                                    by_source=h2k.network_map))
    needed = sum(disk.allocated_bytes or 0 for disk in vm.disks)
    if (room := space_problem(h2k.output_dir / safe_name(vm.name), needed)) is not None:
        blockers.append(room)
    domain_type = pick_domain_type(h2k.domain_type, uri)
    if (firmware := firmware_problem(uri, vm, domain_type, uefi=h2k.uefi_firmware)) is not None:
        blockers.append(firmware)
    warnings = size_warnings(uri, vm)
    if strict:
        blockers += [Blocker(code="host_too_small", message=(
            f"{warning} (hyper2kvm_integration.strict)")) for warning in warnings]
        warnings = []
    return blockers, warnings


def warm_problem(job: JobDefinition, *, converts: bool) -> str | None:
    """Why `job`, asked to migrate warm, cannot (None: it can, or it is not warm)."""
    if not job.options.warm:
        return None
    if not copies_warm(job.provider):
        return f"warm migration is not available for provider {job.provider}"
    if not converts or job.options.keep_export:
        return ("a warm migration copies into the converted images: it needs "
                "hyper2kvm_integration enabled, auto_convert, no daemon_mode, and no "
                "keep_export")
    return None


def find_blockers(job: JobDefinition, vm: VMInfo, provider: Provider, settings: Config, *,
                  converts: bool) -> tuple[list[Blocker], list[str]]:
    """Everything that would stop `job`, and what is only worth a warning: the source
    (can it export this, may we), and where it converts, this host."""
    blockers: list[Blocker] = []
    if (problem := warm_problem(job, converts=converts)) is not None:
        blockers.append(Blocker(code="warm_not_available", message=problem))
    try:
        provider.check_export(vm, job.options, converts=converts)
    except InvalidRequest as exc:
        blockers.append(Blocker(code="export_not_possible", message=str(exc)))
    blockers += provider.blockers(vm, job.options, converts=converts)
    warnings: list[str] = []
    if not converts:
        return blockers, warnings
    integration, h2k = job.hyper2kvm_integration, settings.hyper2kvm
    try:
        guest_mode(integration, h2k)
    except (InvalidRequest, ConfigError) as exc:
        blockers.append(Blocker(code="guest_conversion_unavailable", message=str(exc)))
    found, warnings = destination_findings(vm, h2k, strict=integration.strict)
    blockers += [Blocker(code=b.code, message=f"this host cannot run {vm.name} as it would be "
                         f"defined: {b.message}") for b in found]
    if not integration.replace_existing:
        name = safe_name(vm.name)
        if (taken := name_taken(h2k.libvirt_uri, name)) is not None:
            blockers.append(Blocker(code="domain_exists", message=taken))
        folder = h2k.output_dir / name
        existing = sorted(p.name for p in folder.glob(f"{name}-disk*"))
        if existing:
            blockers.append(Blocker(code="output_exists", message=(
                f"{folder} already holds {', '.join(existing)}; set "
                "hyper2kvm_integration.replace_existing to overwrite")))
    return blockers, warnings


def refuse(blockers: list[Blocker]) -> None:
    """A real job stops at its blockers: one error naming each."""
    if blockers:
        raise InvalidRequest("; ".join(blocker.message for blocker in blockers))


def dry_run(job: JobDefinition, settings: Config, *, converts: bool,
            throughput: float | None) -> DryRun:
    """What `job` would do and what stops it; `throughput`: bytes of disk a second this
    daemon's earlier jobs of the provider moved, for the estimate."""
    with get_provider(job.provider, settings) as provider:
        vm = provider.get_vm(job.vm_identifier)
        blockers, warnings = find_blockers(job, vm, provider, settings, converts=converts)
    disk_bytes = sum(disk.capacity_bytes for disk in vm.disks)
    known = [disk.allocated_bytes for disk in vm.disks if disk.allocated_bytes is not None]
    output: Path | None = None
    free: int | None = None
    if converts:
        output, free = free_space(settings.hyper2kvm.output_dir / safe_name(vm.name))
    return DryRun(
        vm=vm, domain_name=safe_name(vm.name) if converts else None, disk_bytes=disk_bytes,
        data_bytes=sum(known) if len(known) == len(vm.disks) else None,
        output_dir=str(output) if output else None, output_free_bytes=free,
        estimated_seconds=round(disk_bytes / throughput, 1) if throughput else None,
        blockers=blockers, warnings=warnings)
