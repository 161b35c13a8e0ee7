"""The backup-policy flow: every VM its filter matches now is backed up by a migrate-vm
run into `<export base>/<policy>/<vm>/<stamp>/`, then retention prunes old backups."""

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_run
from prefect.states import Completed, Failed, State

from core.config import Config, config_from_env
from core.files import make_durable
from core.models import BackupOutcome, BackupPolicy, BackupReport, JobDefinition, VMSummary
from core.paths import confine, safe_name
from core.process import exit_with_daemon
from flows import DEPLOYMENT
from providers import get_provider
from tasks.retention import prune, read_backups, stamp, write_marker


@task(name="resolve-vms")
def resolve_vms(policy: BackupPolicy) -> list[VMSummary]:
    """The VMs the filter matches at run time (VMs added since are picked up)."""
    with get_provider(policy.provider, config_from_env()) as provider:
        return provider.list_vms(policy.vm_filter)


def ended_runs(run_ids: set[str]) -> frozenset[str]:
    """Those of `run_ids` that Prefect has in a final state, or has not at all."""
    ids = {UUID(run_id) for run_id in run_ids if _is_uuid(run_id)}
    if not ids:
        return frozenset(run_ids)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=sorted(ids))), limit=len(ids))
    active = {str(run.id) for run in runs if run.state is None or not run.state.is_final()}
    return frozenset(run_ids - active)


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


@task(name="retention")
def apply_retention(policy: BackupPolicy, root: Path) -> list[str]:
    now = datetime.now(UTC)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    running = {backup.run_id for folder in folders for backup in read_backups(folder)
               if backup.status == "running" and backup.run_id
               and backup.run_id != str(current_run.id)}
    ended = ended_runs(running)
    pruned: list[Path] = []
    for vm_folder in folders:
        pruned += prune(vm_folder, policy.retention, now, ended_runs=ended)
    return [str(p) for p in pruned]


async def back_up(vm: VMSummary, policy: BackupPolicy, settings: Config, taken: str,
                  limit: asyncio.Semaphore) -> BackupOutcome:
    async with limit:
        relative = f"{policy.name}/{safe_name(vm.name)}/{taken}"
        folder = settings.export.base_path / relative
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, status="running", vm=vm.identifier,
                     policy_run=str(current_run.id), started_at=datetime.now(UTC).isoformat())
        options = policy.export_options
        job = JobDefinition(vm_identifier=vm.identifier, provider=policy.provider,
                            export_method=options.export_method, export_path=relative,
                            options=options.options,
                            hyper2kvm_integration=options.hyper2kvm_integration)
        try:
            run = await run_deployment(  # type: ignore[misc]
                f"migrate-vm/{DEPLOYMENT}", parameters={"job": job.model_dump(mode="json")},
                timeout=None, as_subflow=True, tags=["hypersdk", f"backup:{policy.name}"])
            ok = run.state is not None and run.state.is_completed()
            error = None if ok else (run.state.message if run.state else "no state")
            job_id: str | None = str(run.id)
        except Exception as exc:  # noqa: BLE001 - one VM failing must not stop the others
            ok, error, job_id = False, f"{type(exc).__name__}: {exc}", None
        if ok:
            # "completed" lets retention delete older backups: it must never outlive, in a
            # power cut, the data it vouches for
            await asyncio.to_thread(make_durable, folder)
        write_marker(folder, status="completed" if ok else "failed", vm=vm.identifier,
                     job_id=job_id, error=error, finished_at=datetime.now(UTC).isoformat())
        return BackupOutcome(vm=vm.name, job_id=job_id, path=str(folder), error=error)


def report_markdown(report: BackupReport) -> str:
    lines = [f"# Backup policy `{report.policy}`", "", f"* Started: {report.started_at}",
             f"* Backed up: {len(report.backed_up)}, failed: {len(report.failed)}, "
             f"pruned: {len(report.pruned)}", "", "| VM | result | job | path or error |",
             "|---|---|---|---|"]
    lines += [f"| {o.vm} | backed up | {o.job_id} | `{o.path}` |" for o in report.backed_up]
    lines += [f"| {o.vm} | failed | {o.job_id or '-'} | {o.error} |" for o in report.failed]
    lines += ["", "Pruned:", *[f"* `{p}`" for p in report.pruned or ["(nothing)"]]]
    return "\n".join(lines)


@flow(name="backup-policy", persist_result=True)
async def backup_policy(policy: BackupPolicy) -> State:
    """Back up every matching VM (`policy.concurrency` at once), then apply retention."""
    exit_with_daemon()  # a SIGKILLed hypervisord leaves no run behind
    settings = config_from_env()
    logger = get_run_logger()
    # whoever created the run: the policy's folder (which retention deletes in) is
    # inside export.base_path, symlinks resolved
    policy_root = confine(policy.name, settings.export.base_path, what="policy folder")
    started = datetime.now(UTC)
    vms = await asyncio.to_thread(resolve_vms, policy)
    logger.info("policy %s: %d VM(s) match: %s", policy.name, len(vms),
                ", ".join(vm.name for vm in vms) or "none")
    limit = asyncio.Semaphore(policy.concurrency)
    outcomes = await asyncio.gather(*(back_up(vm, policy, settings, stamp(started), limit)
                                      for vm in vms))
    report = BackupReport(policy=policy.name, started_at=started.isoformat(),
                          backed_up=[o for o in outcomes if o.error is None],
                          failed=[o for o in outcomes if o.error is not None])
    report.pruned = await asyncio.to_thread(apply_retention, policy, policy_root)
    for path in report.pruned:
        logger.info("retention removed %s", path)
    await create_markdown_artifact(  # type: ignore[misc]
        report_markdown(report), key=f"backup-{safe_name(policy.name).lower()}",
        description=f"Backup policy {policy.name}")
    summary = (f"{len(report.backed_up)} backed up, {len(report.failed)} failed, "
               f"{len(report.pruned)} pruned")
    if report.failed:
        return Failed(message=f"{len(report.failed)} of {len(vms)} VM backup(s) failed; "
                              f"{summary}", data=report)
    return Completed(message=summary, data=report)
