"""Scale-out's peers: a private PostgreSQL cluster (initdb on a free port, as its own
user), Prefect's own server on it, and conversion hosts: each a `hypervisord worker` with
its own config and folders (as separate machines have their own disks), sharing only
what the README asks hosts to share (the local inbox, the export folder, results)."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from core.process import children
from tests.peers import (
    BIN,
    Daemon,
    free_port,
    start_daemon,
    stop_daemon,
    wait_until,
    write_config,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # initdb and postgres refuse to run as root


def _as_postgres(*command: str | Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["runuser", "-u", PG_USER, "--", *map(str, command)], check=True,
                   capture_output=True, env=env, cwd="/")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port, password-protected;
    yields the SQLAlchemy URL of its `prefect` database."""
    folder = Path(tempfile.mkdtemp(prefix="hypersdk-pg-"))
    entry = pwd.getpwnam(PG_USER)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    data = folder / "data"
    password = secrets.token_hex(12)
    password_file = folder / "password"
    password_file.write_text(password + "\n")
    os.chown(password_file, entry.pw_uid, entry.pw_gid)
    port = free_port()
    _as_postgres(PG_BIN / "initdb", "-D", data, "-U", "prefect", "--pwfile", password_file,
                 "-A", "scram-sha-256", "--no-sync", "-E", "UTF8")
    _as_postgres(PG_BIN / "pg_ctl", "-D", data, "-l", folder / "postgres.log", "-w", "-o",
                 f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c max_connections=200", "start")
    try:
        _as_postgres(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
                     "prefect", env={"PGPASSWORD": password, "PATH": os.environ["PATH"]})
        yield f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _as_postgres(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class PoolServer:
    url: str
    auth: str
    process: subprocess.Popen

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this server (and of nothing else)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=self.url, PREFECT_API_AUTH_STRING=self.auth,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
        return env


@contextlib.contextmanager
def prefect_on_postgres(database_url: str, log: Path) -> Iterator[PoolServer]:
    """Prefect's own server (`prefect server start`, all its services) on the database."""
    port = free_port()
    auth = f"hypersdk:{secrets.token_hex(16)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_DATABASE_CONNECTION_URL=database_url,
               PREFECT_SERVER_API_AUTH_STRING=auth, PREFECT_API_AUTH_STRING=auth,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(log.parent / "home"),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
               # a run that finds the pool full tries again after 1 s, not 30
               PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1")
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = PoolServer(url=f"http://127.0.0.1:{port}/api", auth=auth, process=process)

    def healthy() -> bool:
        assert process.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=180, what="Prefect on PostgreSQL")
    try:
        yield server
    finally:
        end_group(process, timeout=30)


def end_group(process: subprocess.Popen, *, timeout: float) -> None:
    """SIGTERM to the process's group (started with start_new_session), SIGKILL to what
    is left after `timeout`: nothing it started outlives the test to take later jobs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class Host:
    """One conversion host: its config, its own disk, and its worker once started."""

    name: str
    root: Path
    config: Path
    worker: subprocess.Popen | None = None

    @property
    def images(self) -> Path:
        return self.root / "images"

    def disks(self, vm: str) -> list[str]:
        folder = self.images / vm
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def host_config(root: Path, *, shared: Path, workers: int = 4, compress: bool = False) -> Path:
    """A host's config: inbox and exports on the shared storage, results in the shared
    folder, images and database on its own disk; `compress`: compressed qcow2 outputs."""
    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root, port=free_port(), api_key=None)
    text = config.read_text()
    text = text.replace(f'path: "{root / "inbox"}"', f'path: "{shared / "inbox"}"')
    text = text.replace('base_path: "/tmp/exports"', f'base_path: "{shared / "exports"}"')
    text = text.replace("  workers: 4\n", f"  workers: {workers}\n")
    if compress:
        text = text.replace("  default_format: qcow2\n",
                            "  default_format: qcow2\n  compression: true\n")
    text += f'pool:\n  name: "hypersdk"\n  results: "{shared / "results"}"\n'
    config.write_text(text)
    return config


def hypervisord(*args: str, env: dict[str, str], timeout: float = 120
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "hypervisord"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_worker(host: Host, server: PoolServer, *, limit: int) -> subprocess.Popen:
    """`hypervisord worker` for `host`; returns once it has sent the server a heartbeat
    (a worker of that name that died may still be listed as online for a while)."""
    launched = datetime.now(UTC)
    log = host.root / f"worker-{int(time.time() * 1000)}.log"
    host.worker = subprocess.Popen(
        [str(BIN / "hypervisord"), "worker", "--config", str(host.config), "--limit",
         str(limit), "--name", host.name],
        env=server.env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1"),
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    process = host.worker

    def online() -> bool:
        assert process.poll() is None, f"worker {host.name} exited:\n{log.read_text()[-3000:]}"
        answer = httpx.post(f"{server.url}/work_pools/hypersdk/workers/filter",
                            auth=tuple(server.auth.split(":", 1)),  # type: ignore[arg-type]
                            json={}, timeout=5)
        return any(w["name"] == host.name and w["last_heartbeat_time"] and
                   datetime.fromisoformat(w["last_heartbeat_time"]) > launched
                   for w in answer.json())

    wait_until(online, timeout=90, interval=0.5, what=f"worker {host.name}")
    return process


def process_tree(pid: int) -> list[int]:
    found = [pid]
    for child in children(pid):
        found += process_tree(child)
    return found


def kill_host(host: Host) -> None:
    """As when the machine dies: the worker and every process under it, at once."""
    assert host.worker is not None
    for pid in process_tree(host.worker.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    host.worker.wait(timeout=10)


def stop_worker(host: Host) -> None:
    if host.worker is not None and host.worker.poll() is None:
        host.worker.send_signal(signal.SIGTERM)
        try:
            host.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_host(host)



@dataclass
class Pool:
    """A Prefect server on PostgreSQL with the deployments on its pool, the API
    (`hypervisord --no-serve`), and two conversion hosts, a and b (a compresses its
    outputs, so its conversions take a while), their workers not started."""

    server: PoolServer
    shared: Path
    deployer: Path
    api: httpx.Client
    daemon: Daemon
    a: Host
    b: Host

    @property
    def inbox(self) -> Path:
        return self.shared / "inbox"

    def rest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Prefect's REST API, as its UI uses it."""
        user, password = self.server.auth.split(":", 1)
        return httpx.request(method, f"{self.server.url}{path}", auth=(user, password),
                             timeout=30, **kwargs)

    def submit(self, vm: str) -> str:
        answer = self.api.post("/jobs/submit", json={"vm_identifier": vm, "provider": "local"})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["job_id"])

    @contextlib.contextmanager
    def workers(self, *hosts: Host, limit: int = 2) -> Iterator[None]:
        try:
            for host in hosts:
                start_worker(host, self.server, limit=limit)
            yield
        finally:
            for host in hosts:
                stop_worker(host)


@contextlib.contextmanager
def running_pool(root: Path, *, pool_limit: int) -> Iterator[Pool]:
    """Everything of a Pool, deployed with daemon.workers = `pool_limit`; all of it stopped
    on leaving."""
    shared = root / "shared"
    for folder in ("inbox", "exports", "results"):
        (shared / folder).mkdir(parents=True, exist_ok=True)
    with postgres_cluster() as database, \
            prefect_on_postgres(database, root / "prefect-server.log") as server:
        deployer = host_config(root / "deployer", shared=shared, workers=pool_limit)
        deployed = hypervisord("deploy", "--config", str(deployer), env=server.env())
        assert deployed.returncode == 0, deployed.stderr
        daemon = start_daemon(root / "api", api_key=None, args=("--no-serve",),
                              config=host_config(root / "api", shared=shared),
                              environ=server.env())
        hosts = [Host(name=name, root=root / name,
                      config=host_config(root / name, shared=shared, compress=name == "a"))
                 for name in ("a", "b")]
        try:
            with daemon.client(key=None) as api:
                yield Pool(server=server, shared=shared, deployer=deployer, api=api,
                           daemon=daemon, a=hosts[0], b=hosts[1])
        finally:
            for host in hosts:
                stop_worker(host)
            stop_daemon(daemon)
