"""A warm migration rolled back after its cutover: the domain it defined undefined (and
stopped, if it was started), its disks kept or removed as asked, and the source powered on
again where the cutover stopped it."""

from __future__ import annotations

from core.config import Config
from core.models import JobDefinition, MigrationResult
from hyper2kvm.registration import undefine_domain
from providers import get_provider


def roll_back(job: JobDefinition, result: MigrationResult, settings: Config, *,
              remove_disks: bool) -> str:
    """What was done, in a sentence."""
    done: list[str] = []
    if result.domain_name and result.libvirt_uri:
        if undefine_domain(result.libvirt_uri, result.domain_name):
            done.append(f"domain {result.domain_name} undefined")
        else:
            done.append(f"domain {result.domain_name} was not defined any more")
    if remove_disks:
        for disk in result.disks:
            disk.path.unlink(missing_ok=True)
        done.append(f"{len(result.disks)} disk(s) removed")
    elif result.disks:
        done.append(f"disks kept in {result.disks[0].path.parent}")
    if result.warm is not None and any(r.stopped_source for r in result.warm.rounds):
        with get_provider(job.provider, settings) as provider:
            provider.power_on(job.vm_identifier)
        done.append(f"{job.vm_identifier} powered on again on {job.provider}")
    return "; ".join(done) or "nothing to undo"
