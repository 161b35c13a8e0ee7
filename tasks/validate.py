"""The validate step: checks that can fail cheaply, before any byte moves."""

from __future__ import annotations

import os
import socket

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.context import get_run_context

from core.config import CONFIG_ENV, Config, config_from_env
from core.errors import ConfigError, Conflict
from core.models import JobDefinition, VMInfo
from hyper2kvm.registration import connect
from providers import get_provider
from tasks.preflight import find_blockers, refuse
from tasks.progress import LABEL, JobProgress, current_flow_run_id

ACTIVE = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
CLAIMED = f"{LABEL}vm_claimed"


def vm_tag(provider: str, identifier: str) -> str:
    """The tag every job of one VM carries (the provider's own id for it, so that two
    names of one VM are one VM)."""
    return f"vm-id:{provider}:{identifier}"


def claim_vm(tag: str) -> None:
    """One job per VM at a time, whoever created the run: tag this run, then give way
    (Conflict) to another active run of the VM that was created earlier or has already
    claimed it; otherwise claim it. The REST API refuses a second job up front; this
    covers runs made through Prefect, schedules and backups."""
    run_id = current_flow_run_id()
    with get_client(sync_client=True) as client:
        own = client.read_flow_run(run_id)
        if tag not in own.tags:
            client.update_flow_run(run_id, tags=[*own.tags, tag])
        others = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE))), limit=50)
        mine = (own.created, str(own.id))
        for other in others:
            if other.id == run_id:
                continue
            if (other.created, str(other.id)) < mine or (other.labels or {}).get(CLAIMED):
                raise Conflict(f"VM {tag.split(':', 2)[2]!r} already has job {other.id} "
                               "running; one job per VM at a time")
        client.update_flow_run_labels(run_id, {CLAIMED: True})


def check_this_host(settings: Config, *, provider: str, converts: bool) -> None:
    """What a conversion host needs, checked before anything else runs here, with an error
    that names the host and what is missing: a worker on a pool passes its own config; the
    folders the job writes exist and are writable; libvirt answers when the job converts;
    the local provider's inbox exists (on several hosts: shared storage at the same path)."""
    host = socket.gethostname()
    work_pool = getattr(getattr(get_run_context(), "flow_run", None), "work_pool_name", None)
    if work_pool and not os.environ.get(CONFIG_ENV):
        raise ConfigError(f"host {host}: {CONFIG_ENV} is not set, so this run would use the "
                          f"built-in defaults; start the worker of pool {work_pool!r} with "
                          "`hypervisord worker --config FILE`")
    folders = [("export.base_path", settings.export.base_path)]
    if converts:
        folders.append(("hyper2kvm.output_dir", settings.hyper2kvm.output_dir))
    for key, folder in folders:
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"host {host}: {key} {folder} is not a writable folder")
    if provider == "local" and settings.providers.local and \
            not settings.providers.local.path.is_dir():
        raise ConfigError(f"host {host}: the local provider's inbox "
                          f"{settings.providers.local.path} does not exist (with several "
                          "hosts it must be shared storage mounted at the same path)")
    if converts:
        with connect(settings.hyper2kvm.libvirt_uri):
            pass


@task(name="validate", persist_result=True)
def validate_job(job: JobDefinition, *, converts: bool) -> VMInfo:
    """The VM exists, no other job is migrating it, and nothing a dry run would find
    stops it (tasks.preflight): the job fails here, before anything is made in the source
    or copied."""
    settings = config_from_env()
    with get_provider(job.provider, settings) as provider:
        vm = provider.get_vm(job.vm_identifier)
        claim_vm(vm_tag(job.provider, vm.identifier))
        progress = JobProgress.for_current_run(vm.name)
        progress.start("validate", 0)
        progress.note(vm=vm.name)
        blockers, _warnings = find_blockers(job, vm, provider, settings, converts=converts)
    refuse(blockers)
    progress.finish()
    get_run_logger().info("%s: %d vCPU, %d MiB, %s firmware, %d disk(s), %d NIC(s)", vm.name,
                          vm.cpus, vm.memory_mb, vm.firmware, len(vm.disks), len(vm.nics))
    return vm
