"""hypervisord: the REST API, the Prefect runner serving the flows, and (when no
PREFECT_API_URL is set) an embedded Prefect server, in one process.

Prefect reads its settings when first imported, so everything Prefect must know is put
in the environment before any module that imports Prefect is loaded."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from core.config import Config, load_config
from core.errors import ConfigError, HypersdkError
from core.files import private_folder
from core.process import DAEMON_PID

logger = logging.getLogger("hypervisord")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host(settings: Config) -> str:
    """daemon.address's host, or loopback when no API key protects the API."""
    host = settings.daemon.host
    if not settings.api_key and not _is_loopback(host):
        logger.warning("no API key configured (daemon.api_key or HYPERSDK_API_KEY): "
                       "listening on 127.0.0.1 only instead of %s", host)
        return "127.0.0.1"
    if not settings.api_key:
        logger.warning("no API key configured: the API is open to local users")
    return host


def protect_data_dir(settings: Config) -> Path:
    """The database's folder: 0700, or 0711 (others may pass through, not list it) when an
    export, image or inbox folder lies inside it, since qemu runs as another user and must
    reach the disks. The database's own files are made 0600 by WebhookStore."""
    data_dir = settings.database.path.parent
    data_real = Path(os.path.realpath(data_dir))
    shared = any(data_real in Path(os.path.realpath(root)).parents
                 for root in settings.source_roots())
    private_folder(data_dir, 0o711 if shared else 0o700)
    return data_dir


def warn_if_readable(config_path: str | None) -> None:
    """config.yaml may hold passwords and keys: say so when other users can read it."""
    if config_path and Path(config_path).stat().st_mode & 0o044:
        logger.warning("%s is readable by other users; it may hold secrets: chmod 600 it",
                       config_path)


def prepare_environment(settings: Config, config_path: str | None) -> Path:
    """Directories and the environment the daemon and its flow runs share."""
    data_dir = protect_data_dir(settings)
    for folder in (settings.export.base_path, settings.hyper2kvm.output_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if settings.providers.local:
        settings.providers.local.path.mkdir(parents=True, exist_ok=True)
    if config_path:
        os.environ["HYPERSDK_CONFIG"] = str(Path(config_path).resolve())
    defaults = {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(data_dir / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(data_dir / "prefect" / "results"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_LOGGING_LEVEL": settings.daemon.log_level.upper(),
        # what providers log in a run (snapshot ids, retried blocks) is in the job's logs
        "PREFECT_LOGGING_EXTRA_LOGGERS": "providers",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return data_dir


def use_remote_server(settings: Config) -> None:
    """Talk to the Prefect server PREFECT_API_URL names, with daemon.prefect_auth_string."""
    logger.info("using the Prefect server at %s", os.environ["PREFECT_API_URL"])
    if settings.daemon.prefect_auth_string:
        os.environ["PREFECT_API_AUTH_STRING"] = (
            settings.daemon.prefect_auth_string.get_secret_value())
    if not os.environ.get("PREFECT_API_AUTH_STRING") and not os.environ.get("PREFECT_API_KEY"):
        logger.warning("no PREFECT_API_AUTH_STRING: if that server does not require "
                       "authentication, anyone who reaches it can start flow runs")


@contextlib.contextmanager
def prefect_server(settings: Config, data_dir: Path) -> Iterator[str | None]:
    """Start the embedded Prefect server unless PREFECT_API_URL names one; yield the UI URL."""
    if os.environ.get("PREFECT_API_URL"):
        use_remote_server(settings)
        yield None
        return
    from api.prefect_server import EmbeddedPrefect, server_credential

    configured = settings.daemon.prefect_auth_string
    credential = server_credential(
        data_dir / "prefect", configured.get_secret_value() if configured else None)
    server = EmbeddedPrefect(data_dir=data_dir / "prefect", port=settings.daemon.prefect_ui_port,
                             log_file=data_dir / "prefect-server.log", auth_string=credential,
                             host=settings.daemon.prefect_host)
    logger.info("starting the embedded Prefect server (SQLite in %s); its API and UI ask "
                "for the credential in %s", server.data_dir,
                "daemon.prefect_auth_string" if configured else server.data_dir / "auth_string")
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    # this process and every flow run it starts authenticate with it
    os.environ["PREFECT_API_AUTH_STRING"] = credential
    os.environ.pop("PREFECT_API_KEY", None)
    try:
        yield server.url
    finally:
        logger.info("stopping the embedded Prefect server")
        server.stop()


async def serve(settings: Config, host: str, *, serve_flows: bool) -> None:
    """Run the REST API and the flow runner until SIGTERM or SIGINT."""
    import httpx
    import uvicorn
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner
    from prefect.types.entrypoint import EntrypointType

    from api.main import DEPLOYMENT, create_app
    from api.pool import refuse_pool_deployments
    from api.recovery import (
        drain,
        interrupted_runs,
        keep_export_slots_true,
        reconcile_export_slots,
        recover,
    )
    from flows.backup_policy import backup_policy
    from flows.convert_vm import convert_vm
    from flows.migrate_vm import migrate_vm
    from tasks.export import ensure_export_limit

    try:
        await asyncio.to_thread(ensure_export_limit, settings.export.concurrent_exports,
                                update=True)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the Prefect server at "
                          f"{os.environ.get('PREFECT_API_URL')}: {exc}") from None
    if serve_flows:
        # flow runs this process starts exit when it dies (core.process); set before the
        # runners exist, which copy the environment their runs get
        os.environ[DAEMON_PID] = str(os.getpid())
    # Jobs take one of daemon.workers slots. A backup run only starts its VMs' jobs and
    # waits for them: served by its own runner, without a limit, it never holds a slot
    # those jobs need (with workers <= backup runs at once they would wait forever).
    runner = Runner(name="hypervisord", limit=settings.daemon.workers, pause_on_shutdown=False,
                    query_seconds=1)
    coordinator = Runner(name="hypervisord-backups", limit=None, pause_on_shutdown=False,
                         query_seconds=1)
    runners = (runner, coordinator)
    if serve_flows:
        async with get_client() as probe:
            await refuse_pool_deployments(probe)
        for served, serving in ((migrate_vm, runner), (convert_vm, runner),
                                (backup_policy, coordinator)):
            deployment = await served.ato_deployment(
                name=DEPLOYMENT, entrypoint_type=EntrypointType.MODULE_PATH)
            # Registering again at each start must keep the schedules and backup policies
            # users made (through the API or in the Prefect UI): with `schedules` unset, the
            # update Prefect sends leaves them alone (an explicit [] would replace them).
            deployment.__pydantic_fields_set__.discard("schedules")
            await serving.aadd_deployment(deployment)
    stack = contextlib.AsyncExitStack()
    client = await stack.enter_async_context(get_client())
    background: list[asyncio.Task[None]] = []
    if serve_flows:
        # what the last life of this daemon left running is cleaned up and put back in line
        await recover(client, await interrupted_runs(client, deployment=DEPLOYMENT),
                      resume=settings.daemon.resume_interrupted)
        await reconcile_export_slots(client)
        background.append(asyncio.create_task(keep_export_slots_true(client),
                                              name="export-slots"))

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # we handle signals ourselves
            yield

    api = Server(uvicorn.Config(create_app(settings), host=host, port=settings.daemon.port,
                                log_level=settings.daemon.log_level, lifespan="on"))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handle_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)

    handle_signals()  # from the start: a SIGTERM during startup is a clean stop too
    tasks = [asyncio.create_task(api.serve(), name="api")]
    if serve_flows:
        tasks += [asyncio.create_task(serving.start(), name=serving.name)
                  for serving in runners]
        await asyncio.sleep(0.5)  # runners install their own SIGTERM handler: ours again
        handle_signals()
    logger.info("REST API on http://%s:%d (OpenAPI at /docs)", host, settings.daemon.port)
    done_waiter = asyncio.create_task(stopping.wait())
    finished, _ = await asyncio.wait([*tasks, done_waiter], return_when=asyncio.FIRST_COMPLETED)
    logger.info("shutting down")
    if serve_flows and done_waiter in finished:
        await drain(list(runners), client, deployment=DEPLOYMENT,
                    grace=settings.daemon.shutdown_grace,
                    resume=settings.daemon.resume_interrupted)
    api.should_exit = True
    for serving in runners:
        if serve_flows and serving.started:
            await serving.astop()
    for task in background:
        task.cancel()
    await asyncio.gather(*tasks, *background, return_exceptions=True)
    await stack.aclose()
    await flush_to_prefect()
    for ended in finished:
        if ended is not done_waiter and ended.exception():
            raise ended.exception()  # type: ignore[misc]


async def flush_to_prefect(timeout: float = 10.0) -> None:
    """Send the logs and events still queued while the server is up, then stop sending:
    a log written after the embedded server stops would be retried against it for a
    minute or more before the process could exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler, APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.drain_all(timeout=timeout),  # type: ignore[arg-type]
                                   timeout + 1)
    loggers = [logging.getLogger(), *(item for item in logging.root.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]
    for each in loggers:
        for handler in list(each.handlers):
            if isinstance(handler, APILogHandler):
                each.removeHandler(handler)


def check_host(settings: Config) -> int:
    """`--check`: the config is valid; qemu can reach the output folder; how domains will
    run here (KVM or TCG, which CPU); whether guest conversion is possible."""
    from hyper2kvm import guest
    from hyper2kvm.access import check_qemu_reaches
    from hyper2kvm.cpu import domain_type_and_cpu

    print("configuration is valid")
    h2k = settings.hyper2kvm
    output = h2k.output_dir
    try:
        if output.exists():  # a disk in it is as reachable as anything inside it
            check_qemu_reaches(h2k.libvirt_uri, [output / "disk"])
        domain_type, cpu = domain_type_and_cpu(h2k.domain_type, h2k.libvirt_uri)
    except HypersdkError as exc:
        print(f"hyper2kvm ({h2k.libvirt_uri}, {output}): {exc}")
        return 1
    print(f"domains run as {domain_type} with CPU {cpu.describe()} on {h2k.libvirt_uri}")
    if guest.available():
        print(f"guest conversion: {guest.TOOL} (libguestfs with "
              f"{guest.accelerator(h2k.libvirt_uri)[0]})")
    elif h2k.convert_guest is True:
        print(f"hyper2kvm.convert_guest is on but {guest.TOOL} is not installed "
              "(Debian: apt install virt-v2v)")
        return 1
    else:
        print(f"guest conversion: off ({guest.TOOL} is not installed)")
    return 0


def _command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypervisord", description=__doc__.split("\n")[0])
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=argparse.SUPPRESS,
                        help="config.yaml (default: built-in defaults)")
    parser.add_argument("--config", help="config.yaml (default: built-in defaults)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--no-serve", action="store_true",
                        help="do not run flows here (workers on a work pool run them)")
    commands = parser.add_subparsers(dest="command", metavar="{deploy,worker}")
    commands.add_parser(
        "deploy", parents=[config],
        help="put the work pool, its limits, result storage and the deployments on the "
             "Prefect server PREFECT_API_URL names (scale-out)")
    worker = commands.add_parser(
        "worker", parents=[config],
        help="run this conversion host's Prefect worker on the pool (scale-out)")
    worker.add_argument("--limit", type=int, default=None,
                        help="runs this host starts at once (default: daemon.workers)")
    worker.add_argument("--name", default=None, help="the worker's name (default: host name)")
    return parser


def scale_out(command: str, settings: Config, args: argparse.Namespace) -> int:
    """`hypervisord deploy` and `hypervisord worker`."""
    from api import pool

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("PREFECT_API_URL is not set: name the Prefect server (on "
                          "PostgreSQL) the pool runs on")
    use_remote_server(settings)
    if command == "deploy":
        for name in asyncio.run(pool.deploy(settings)):
            print(f"deployed {name} onto work pool {settings.pool.name!r}")
        print(f"runs at once across the pool: {settings.daemon.workers}; exports: "
              f"{settings.export.concurrent_exports}; results: {settings.pool.results}")
        return 0
    if not args.config:
        raise ConfigError("hypervisord worker needs --config: this host's config.yaml, "
                          "which its runs read")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if check_host(settings) != 0:
        return 1
    asyncio.run(pool.ready_worker(settings))
    pool.exec_worker(settings, args.config, limit=args.limit, name=args.name)
    return 0  # not reached: exec_worker replaces this process


def main(argv: list[str] | None = None) -> int:
    args = _command_line().parse_args(argv)
    try:
        settings = load_config(args.config)
    except ConfigError as exc:
        print(f"hypervisord: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.daemon.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.check:
        return check_host(settings)
    try:
        data_dir = prepare_environment(settings, args.config)
        if args.command:
            return scale_out(args.command, settings, args)
        warn_if_readable(args.config)
        host = bind_host(settings)
        with prefect_server(settings, data_dir) as ui:
            if ui:
                logger.info("Prefect UI on %s", ui)
            asyncio.run(serve(settings, host, serve_flows=not args.no_serve))
    except HypersdkError as exc:
        print(f"hypervisord: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
