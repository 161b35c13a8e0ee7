"""Scale-out on a Prefect work pool, the way Prefect does it: the deployments live on the
server, `prefect worker` processes on the conversion hosts run them, and hypervisord
`--no-serve` is the API.

* `deploy` (hypervisord deploy) puts on the server everything a worker needs, or refuses
  naming what is missing: the process work pool; `daemon.workers` migrations (and as many
  conversions) at once across the pool, as deployment concurrency limits; the export limit
  sized by `export.concurrent_exports`; the storage block every host writes task and flow
  results to (`pool.results`); the three deployments (module-path entrypoints: the
  installed package is the code, so no pull step and no folder to point at; no
  HYPERSDK_CONFIG either: each host's worker passes its own); and automations that mark
  Crashed a run whose host stopped sending heartbeats, Cancelled one asked to cancel there.
* `ready_worker` and `exec_worker` (hypervisord worker): the pool is deployed, what runs
  that died on this host left half-written is removed, then `prefect worker start` with
  this host's config.
* `refuse_pool_deployments`: a serving hypervisord would register its deployments under
  the pool's names, without the pool's job variables, and race the workers: it refuses."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from core.config import CONFIG_ENV, Config
from core.errors import ConfigError, Conflict
from core.files import remove_partials
from core.paths import safe_name
from flows import DEPLOYMENT

logger = logging.getLogger("hypervisord")
QUEUE = "default"
RESULTS_BLOCK = "hypersdk-results"  # the block `pool.results: /folder` becomes
RESULTS_ENV = "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
TAG = "hypersdk"
CRASH_AUTOMATION = "hypersdk: crash runs whose host stopped"
CANCEL_AUTOMATION = "hypersdk: cancel runs whose host stopped"


async def _results_block(settings: Config) -> str:
    """The slug of the storage block every host writes results to: `pool.results` as a
    folder becomes a LocalFileSystem block (the folder must be mounted at that path on
    every host and the API); a slug must name a block that exists and loads."""
    from prefect.blocks.core import Block
    from prefect.filesystems import LocalFileSystem

    where = settings.pool.results
    if where is None:
        raise ConfigError("pool.results is not set: with results on each worker's own disk "
                          "the API shows no result and a retry on another host redoes every "
                          "step; set it to a folder every host mounts, or a storage block")
    if where.startswith("/"):
        block = LocalFileSystem(basepath=where)
        await block.asave(RESULTS_BLOCK, overwrite=True)
        return f"local-file-system/{RESULTS_BLOCK}"
    try:
        await Block.aload(where)
    except (ValueError, ImportError, KeyError) as exc:
        raise ConfigError(f"pool.results: cannot load the storage block {where!r}: {exc}") \
            from None
    return where


async def _work_pool(client: PrefectClient, settings: Config) -> None:
    """The process work pool. It has no limit of its own: a queue or pool limit is checked
    when a worker polls, so two workers polling at once both get runs; the deployments'
    limits are checked when a run is about to start, one at a time."""
    from prefect.workers.process import ProcessWorker

    name = settings.pool.name
    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        await client.create_work_pool(WorkPoolCreate(
            name=name, type=ProcessWorker.type,
            base_job_template=ProcessWorker.get_default_base_job_template()))
        return
    if pool.type != ProcessWorker.type:
        raise ConfigError(f"work pool {name!r} exists with type {pool.type!r}; hypersdk "
                          "runs on a process pool (pool.name names another)")


def job_variables(settings: Config, results: str) -> dict[str, Any]:
    """What every run on the pool gets in its environment, whichever host runs it."""
    return {"env": {
        RESULTS_ENV: results,
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        HEARTBEAT_ENV: str(int(settings.pool.heartbeat)),
        # the providers' logs (parts retried, snapshots made and removed) in the job's logs
        "PREFECT_LOGGING_EXTRA_LOGGERS": "providers",
    }}


async def _automations(settings: Config) -> None:
    """Prefect's recipe for zombie runs, limited to hypersdk's, and its counterpart for a
    cancel that reaches a dead host.

    * A run that sent a heartbeat and then nothing (no heartbeat, no state) for two
      heartbeat periods is Crashed.
    * A run asked to cancel whose host does not confirm within two periods is Cancelled:
      its Cancelling event answers the first trigger, and no heartbeat follows to arm it
      again, so without this it would stay Cancelling for good."""
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    silence = timedelta(seconds=2 * settings.pool.heartbeat)
    ours: dict[str, Any] = {
        "match": ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        "match_related": ResourceSpecification({"prefect.resource.id": f"prefect.tag.{TAG}"}),
        "for_each": {"prefect.resource.id"}, "posture": Posture.Proactive,
        "threshold": 1, "within": silence}
    seconds = int(silence.total_seconds())
    made = [
        Automation(
            name=CRASH_AUTOMATION,
            description="Marks Crashed a hypersdk run whose host stopped sending heartbeats "
                        "(made by hypervisord deploy)",
            trigger=EventTrigger(after={"prefect.flow-run.heartbeat"},
                                 expect={"prefect.flow-run.*"}, **ours),
            actions=[ChangeFlowRunState(
                name="Crashed", state=StateType.CRASHED, force=True,
                message=f"the host running this job sent no heartbeat for {seconds} s: it "
                        "stopped or lost the server")]),
        Automation(
            name=CANCEL_AUTOMATION,
            description="Marks Cancelled a hypersdk run asked to cancel whose host never "
                        "confirmed (made by hypervisord deploy)",
            trigger=EventTrigger(after={"prefect.flow-run.Cancelling"},
                                 expect={f"prefect.flow-run.{state}" for state in (
                                     "Cancelled", "Completed", "Failed", "Crashed")}, **ours),
            actions=[ChangeFlowRunState(
                name="Cancelled", state=StateType.CANCELLED, force=True,
                message=f"cancelled; the host running this job did not confirm within "
                        f"{seconds} s (it stopped; its worker removes the partial files "
                        "when it starts again)")]),
    ]
    for automation in made:
        try:
            existing = await Automation.aread(name=automation.name)
        except ValueError:
            await automation.acreate()
            continue
        automation.id = existing.id
        await automation.aupdate()


async def deploy(settings: Config) -> list[str]:
    """Put the pool, its limits, result storage, the deployments and the crash automation
    on the server; returns the deployments' names."""
    from prefect.types.entrypoint import EntrypointType

    from flows.backup_policy import backup_policy
    from flows.convert_vm import convert_vm
    from flows.migrate_vm import migrate_vm
    from tasks.export import ensure_export_limit

    results = await _results_block(settings)
    await asyncio.to_thread(ensure_export_limit, settings.export.concurrent_exports,
                            update=True)
    deployed = []
    async with get_client() as client:
        await _work_pool(client, settings)
        for served in (migrate_vm, convert_vm, backup_policy):
            # daemon.workers runs of a job flow at once across the pool, enforced by the
            # server as a run is about to start: a worker never starts one beyond it (the
            # run waits, Scheduled, for a slot). A backup run only waits for its VMs' jobs:
            # with a slot of its own it could starve them.
            limit = None if served is backup_policy else settings.daemon.workers
            deployment = await served.ato_deployment(
                name=DEPLOYMENT, entrypoint_type=EntrypointType.MODULE_PATH,
                work_pool_name=settings.pool.name, work_queue_name=QUEUE,
                job_variables=job_variables(settings, results), tags=[TAG],
                concurrency_limit=limit)
            # deploying again keeps the schedules and backup policies users made
            deployment.__pydantic_fields_set__.discard("schedules")
            await deployment.apply(work_pool_name=settings.pool.name)  # type: ignore[misc]
            deployed.append(f"{served.name}/{DEPLOYMENT}")
    await _automations(settings)
    return deployed


async def pool_deployments(client: PrefectClient) -> list[str]:
    """hypersdk's deployments on this server that belong to a work pool."""
    from api.recovery import SERVED_FLOWS

    found = []
    for flow_name in SERVED_FLOWS:
        try:
            deployment = await client.read_deployment_by_name(f"{flow_name}/{DEPLOYMENT}")
        except ObjectNotFound:
            continue
        if deployment.work_pool_name:
            found.append(f"{flow_name}/{DEPLOYMENT} (work pool {deployment.work_pool_name!r})")
    return found


async def refuse_pool_deployments(client: PrefectClient) -> None:
    """A serving hypervisord against a pool's server would overwrite the pool's
    deployments and race its workers: refuse, saying what to run instead."""
    taken = await pool_deployments(client)
    if taken:
        raise Conflict(f"this Prefect server's deployments {', '.join(taken)} run on a work "
                       "pool: start hypervisord with --no-serve (the API only) against it; "
                       "serving them here would replace them")


async def _active_vms(client: PrefectClient) -> set[str]:
    """The VMs (their folder names) that a run anywhere is working on now."""
    from api.recovery import INTERRUPTED, _runs
    from tasks.progress import LABEL

    runs = await _runs(client, INTERRUPTED)  # running, pending or cancelling
    return {safe_name(str(run.labels[f"{LABEL}vm"])) for run in runs
            if (run.labels or {}).get(f"{LABEL}vm")}


def sweep_leftovers(settings: Config, busy: set[str]) -> list[Path]:
    """Half-written files in this host's per-VM folders whose VM is not in `busy` (no run
    is working on it): what a run that died here (host crash, SIGKILL) left. Returns the
    folders swept."""
    swept = []
    for root in (settings.export.base_path, settings.hyper2kvm.output_dir):
        if not root.is_dir():
            continue
        for folder in root.iterdir():
            if folder.is_dir() and not folder.is_symlink() and folder.name not in busy \
                    and any(folder.glob(".*.partial")):
                remove_partials(folder)
                swept.append(folder)
    return swept


async def ready_worker(settings: Config) -> None:
    """The pool and its deployments are on the server; this host's leftovers are gone."""
    async with get_client() as client:
        try:
            await client.read_work_pool(settings.pool.name)
        except ObjectNotFound:
            raise ConfigError(f"work pool {settings.pool.name!r} is not on "
                              f"{os.environ['PREFECT_API_URL']}: run `hypervisord deploy` "
                              "first") from None
        if not await pool_deployments(client):
            raise ConfigError(f"no hypersdk deployment on work pool {settings.pool.name!r}: "
                              "run `hypervisord deploy` first")
        busy = await _active_vms(client)
    for folder in sweep_leftovers(settings, busy):
        logger.warning("removed the partial files a dead run left in %s", folder)


def worker_command(settings: Config, *, limit: int | None, name: str | None) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", settings.pool.name,
            "--type", "process", "--limit", str(limit or settings.daemon.workers),
            "--name", name or f"hypersdk-{socket.gethostname()}"]


def exec_worker(settings: Config, config_path: str, *, limit: int | None,
                name: str | None) -> None:
    """Become this host's Prefect worker; its runs read this host's config."""
    os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
    # Prefect's worker looks for runs every 10 s by default: a job would wait that long
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    command = worker_command(settings, limit=limit, name=name)
    logger.info("starting %s", " ".join(command[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
