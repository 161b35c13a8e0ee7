"""The validate step: checks that can fail cheaply, before any byte moves."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from core.config import config_from_env
from core.errors import InvalidRequest
from core.models import JobDefinition, VMInfo
from core.paths import safe_name
from hyper2kvm.registration import domain_exists
from providers import get_provider
from tasks.progress import JobProgress


@task(name="validate", persist_result=True)
def validate_job(job: JobDefinition, output_dir: Path, *, converts: bool) -> VMInfo:
    """The VM exists; when the job converts, neither its domain nor its output exists
    (unless `replace_existing`)."""
    settings = config_from_env()
    with get_provider(job.provider, settings) as provider:
        vm = provider.get_vm(job.vm_identifier)
    progress = JobProgress.for_current_run(vm.name)
    progress.start("validate", 0)
    progress.note(vm=vm.name)
    name = safe_name(vm.name)
    replace = job.hyper2kvm_integration.replace_existing
    if converts and not replace:
        uri = settings.hyper2kvm.libvirt_uri
        if domain_exists(uri, name):
            raise InvalidRequest(f"a libvirt domain named {name!r} already exists on {uri}; "
                                 "set hyper2kvm_integration.replace_existing to replace it")
        existing = sorted(p.name for p in (output_dir / name).glob(f"{name}-disk*"))
        if existing:
            raise InvalidRequest(f"{output_dir / name} already holds {', '.join(existing)}; "
                                 "set hyper2kvm_integration.replace_existing to overwrite")
    progress.finish()
    get_run_logger().info("%s: %d vCPU, %d MiB, %s firmware, %d disk(s), %d NIC(s)", vm.name,
                          vm.cpus, vm.memory_mb, vm.firmware, len(vm.disks), len(vm.nics))
    return vm
