"""Test peers, started once per session: a real Prefect server (SQLite), libvirtd on
qemu:///system, and hypervisord itself as a real process serving HTTP.

Prefect reads its settings at import, so the environment is set here, before any test
module imports it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SESSION_DIR = Path(tempfile.mkdtemp(prefix="hypersdk-tests-"))
SESSION_DIR.chmod(0o755)  # qemu, started by libvirt as its own user, must reach the disks
LIBVIRT_URI = "qemu:///system"
# The seed's integration script exports to /tmp/exports/<vm>: the test daemon's
# export.base_path is that folder, so the script runs unchanged.
EXPORTS = Path("/tmp/exports")
# the vCenter simulator's one account (tests/vsphere_sim.py starts it); the password
# reaches daemons through the environment, like the seed's ${VSPHERE_PASSWORD}
VSPHERE_USER, VSPHERE_PASSWORD = "administrator@vsphere.local", "vcsim-S3cret!"
os.environ["VSPHERE_PASSWORD"] = VSPHERE_PASSWORD


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PREFECT_PORT = free_port()
# the session's Prefect server requires a credential, as hypervisord's embedded one does;
# every client the tests start (daemons, flow runs, watch daemons) inherits it
PREFECT_AUTH = f"hypersdk:{uuid.uuid4().hex}"
os.environ.update({
    "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
    "PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api",
    "PREFECT_HOME": str(SESSION_DIR / "prefect-home"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(SESSION_DIR / "prefect-results"),
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
})
os.environ.pop("HYPERSDK_API_KEY", None)


def wait_until(check, *, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session", autouse=True)
def qemu_reaches_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    """pytest's temp folders are 0700: qemu (libvirt-qemu) may pass through them, as an
    operator lets it reach hyper2kvm.output_dir (registration refuses disks it cannot)."""
    base = tmp_path_factory.getbasetemp()
    for folder in (base.parent, base):
        folder.chmod(folder.stat().st_mode | 0o011)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's own, which qemu may pass through too (qemu_reaches_tmp_path)."""
    tmp_path.chmod(tmp_path.stat().st_mode | 0o011)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def session_files() -> Iterator[Path]:
    """Set up first, torn down last: the session's directory and the export folders the
    session created are removed once every peer has stopped (a session writes gigabytes).
    HYPERSDK_KEEP_TEST_FILES=1 keeps them for a post-mortem."""
    EXPORTS.mkdir(parents=True, exist_ok=True)
    exports_before = set(EXPORTS.iterdir())
    yield SESSION_DIR
    if os.environ.get("HYPERSDK_KEEP_TEST_FILES"):
        return
    for created in set(EXPORTS.iterdir()) - exports_before:
        if created.is_dir() and not created.is_symlink():
            shutil.rmtree(created, ignore_errors=True)
        else:
            created.unlink(missing_ok=True)
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """Prefect's server on a free port, SQLite in the session's temp dir, launched the way
    hypervisord launches its embedded one (api/prefect_server.py)."""
    log = (SESSION_DIR / "prefect-server.log").open("wb")
    env = dict(os.environ, PREFECT_API_DATABASE_CONNECTION_URL=(
        f"sqlite+aiosqlite:///{SESSION_DIR / 'prefect.db'}"),
        PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
        # schedules made in a test get their runs within seconds, not a minute
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    process = subprocess.Popen(
        [sys.executable, "-m", "api.prefect_server", "--host", "127.0.0.1", "--port",
         str(PREFECT_PORT)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = os.environ["PREFECT_API_URL"]

    def healthy() -> bool:
        assert process.poll() is None, "prefect server exited; see prefect-server.log"
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=120, what="the Prefect server")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def libvirt_uri() -> Iterator[str]:
    """qemu:///system, started if needed. The domains and pools named after what
    `unique()` made are removed at the end."""
    subprocess.run([str(ROOT / "scripts" / "start-libvirt.sh")], check=True)
    yield LIBVIRT_URI
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    for domain in conn.listAllDomains():
        if domain.name().removesuffix("-boot-check") in MADE:
            if domain.isActive():
                domain.destroy()
            if domain.isPersistent():
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    for pool in conn.listAllStoragePools():
        if pool.name().removeprefix("hypersdk-") in MADE:
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    conn.close()


MADE: set[str] = set()  # every name unique() gave: the session's domains are among them


def unique(prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    MADE.add(name)
    return name


@dataclass
class Daemon:
    """A running hypervisord and the directories its config names."""

    url: str
    api_key: str | None
    root: Path
    config: Path
    process: subprocess.Popen
    log: Path
    exit_codes: list[int] = field(default_factory=list)

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def exports(self) -> Path:
        return EXPORTS

    @property
    def watch(self) -> Path:
        return self.root / "watch"

    def client(self, *, key: str | None = "default") -> httpx.Client:
        headers = {}
        key = self.api_key if key == "default" else key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def write_config(root: Path, *, port: int, api_key: str | None, name: str = "config.yaml",
                 host: str = "127.0.0.1", extra: str = "", vsphere: str | None = None,
                 clouds: str = "") -> Path:
    """The daemon's config; with `vsphere` (host:port of a simulator) a vsphere provider
    whose password comes from ${VSPHERE_PASSWORD}, as the seed's config does; `clouds`: the
    cloud providers' sections (tests/aws_sim.py, tests/azure_sim.py write them)."""
    key_line = f'  api_key: "{api_key}"\n' if api_key else ""
    vsphere_section = (f'  vsphere:\n    host: "{vsphere}"\n    username: "{VSPHERE_USER}"\n'
                       f'    password: "${{VSPHERE_PASSWORD}}"\n    insecure: true\n'
                       if vsphere else "")
    config = root / name
    config.write_text(f"""\
daemon:
  address: "{host}:{port}"
  log_level: "info"
  workers: 4
  webhook_allowed_networks: ["127.0.0.0/8"]
  webhook_retry_base: "0.5s"
  webhook_retry_max: "2s"
{key_line}providers:
  local:
    path: "{root / 'inbox'}"
{vsphere_section}{clouds}hyper2kvm:
  output_dir: "{root / 'images'}"
  watch_dir: "{root / 'watch'}"
  default_format: qcow2
  libvirt_uri: "{LIBVIRT_URI}"
  network: user
  poll_interval: "0.5s"
  job_timeout: "5m"
  # the sample VMs are data disks, not guests: tests/test_guest.py asks for both per job
  convert_guest: false
  verify_boot: "off"
export:
  base_path: "{EXPORTS}"
  concurrent_exports: 2
  max_retries: 1
database:
  path: "{root / 'db' / 'hypersdk.db'}"
{extra}""")
    return config


def start_daemon(root: Path, *, api_key: str | None, args: tuple[str, ...] = (),
                 config_name: str = "config.yaml", host: str = "127.0.0.1",
                 vsphere: str | None = None, clouds: str = "", embedded: bool = False,
                 extra_daemon: str = "", config: Path | None = None,
                 environ: dict[str, str] | None = None, workers: int = 4) -> Daemon:
    """Start hypervisord on a free port with a config over the directories under `root`
    (or with an existing `config`, as a restart does); `embedded`: with its own Prefect
    server (none of the session's PREFECT_ settings); `extra_daemon`: more daemon: keys;
    `environ`: its whole environment instead of this process's; `workers`: jobs at once."""
    root.mkdir(parents=True, exist_ok=True)
    if config is None:
        port = free_port()
        config = write_config(root, port=port, api_key=api_key, name=config_name, host=host,
                              vsphere=vsphere, clouds=clouds)
        daemon_keys = extra_daemon
        if embedded:
            daemon_keys += f"  prefect_ui_port: {free_port()}\n"
        config.write_text(config.read_text().replace("  workers: 4\n",
                                                     f"  workers: {workers}\n{daemon_keys}"))
    else:
        port = int(yaml.safe_load(config.read_text())["daemon"]["address"].rpartition(":")[2])
    env = dict(os.environ if environ is None else environ)
    if embedded:
        env = {k: v for k, v in env.items() if not k.startswith("PREFECT_")}
    log = root / f"hypervisord-{port}-{int(time.time() * 1000)}.log"
    process = subprocess.Popen([str(BIN / "hypervisord"), "--config", str(config), *args],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(url=f"http://127.0.0.1:{port}", api_key=api_key, root=root, config=config,
                    process=process, log=log)

    def healthy() -> bool:
        assert process.poll() is None, f"hypervisord exited:\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{daemon.url}/health", timeout=2).json()["status"] == "healthy"
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    wait_until(healthy, timeout=120 if embedded else 90, what="hypervisord")
    return daemon


def stop_daemon(daemon: Daemon) -> int:
    daemon.process.send_signal(signal.SIGTERM)
    return daemon.process.wait(timeout=60)


@contextlib.contextmanager
def peers_and_daemon(name: str, *, api_key: str, extra_daemon: str = "",
                     clouds: str = "", vsphere: str | None = None) -> Iterator[Daemon]:
    """For scripts (bench/): the session's peers and a hypervisord, as the tests have them,
    stopped and their files removed on leaving."""
    server = prefect_server.__wrapped__()  # type: ignore[attr-defined]
    next(server)
    uri = libvirt_uri.__wrapped__()  # type: ignore[attr-defined]
    next(uri)
    daemon = start_daemon(SESSION_DIR / name, api_key=api_key, extra_daemon=extra_daemon,
                          clouds=clouds, vsphere=vsphere)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)
        for generator in (uri, server):
            next(generator, None)
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(prefect_server: str, libvirt_uri: str, vcsim_proxy: Any, moto: Any,
           azure: Any, gcp: Any, oci_peer: Any, hyperv: Any) -> Iterator[Daemon]:
    """hypervisord with an API key, serving the flows, against the session's Prefect, with
    the local provider, the session's vCenter simulator (behind its shaping proxy) as its
    vsphere provider, its moto
    server as its aws provider, Azurite + the ARM stand-in as its azure provider,
    gcp-storage-emulator + the Compute/Cloud Build stand-in as its gcp provider, the OCI
    stand-in as its oci provider and Samba + the WinRM stand-in as its hyperv provider."""
    running = start_daemon(SESSION_DIR / "daemon", api_key="test-key-" + uuid.uuid4().hex,
                           vsphere=vcsim_proxy.address,
                           clouds=(moto.config_section() + azure.config_section()
                                   + gcp.config_section() + oci_peer.config_section()
                                   + hyperv.config_section()))
    yield running
    code = stop_daemon(running)
    assert code == 0, f"hypervisord did not stop cleanly on SIGTERM ({code})"


def start_watch_daemon(watch_dir: Path, output_dir: Path, log: Path,
                       *extra: str, source_root: Path = EXPORTS) -> subprocess.Popen:
    """`hyper2kvm daemon` as the seed's systemd unit starts it, reading sources from
    `source_root` only."""
    return subprocess.Popen(
        [str(BIN / "hyper2kvm"), "daemon", "--watch-dir", str(watch_dir), "--output-dir",
         str(output_dir), "--format", "qcow2", "--log-level", "info", "--poll", "0.2",
         "--source-root", str(source_root), *extra],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.fixture(scope="session")
def watch_daemon(daemon: Daemon) -> Iterator[subprocess.Popen]:
    """hyper2kvm@vsphere for the test daemon: watches <watch_dir>/vsphere."""
    process = start_watch_daemon(daemon.watch / "vsphere", daemon.images,
                                 daemon.root / "hyper2kvm-vsphere.log", "--instance", "vsphere")
    yield process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


@pytest.fixture(scope="session")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as client:
        yield client


@pytest.fixture(scope="session")
def sample_cache() -> Path:
    folder = SESSION_DIR / "samples"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def sample_vm(daemon: Daemon) -> str:
    """A fresh sample OVA in the daemon's inbox; returns its identifier."""
    from hyper2kvm.sample import make_sample_ova

    name = unique()
    make_sample_ova(daemon.inbox, name, size_mib=32, cpus=2, memory_mb=256,
                    mac="52:54:00:ab:cd:ef")
    return name


@pytest.fixture(scope="session")
def guest_disk() -> Path:
    """A real Debian guest as VMware leaves one (scripts/build-guest.sh), built once per
    machine and cached outside the checkout."""
    from hyper2kvm.sample import build_guest_disk

    return build_guest_disk(timeout=1800)


@pytest.fixture(scope="session")
def converted_guest(guest_disk: Path, libvirt_uri: str) -> Path:
    """`guest_disk` after guest conversion (virt-v2v-in-place), as qcow2: made once per
    machine and virt-v2v version (~2 min under TCG), cached beside the guest. Tests only
    read it (through overlays)."""
    from core.models import ConvertedDisk, VMInfo
    from hyper2kvm import qemu_img
    from hyper2kvm.guest import TOOL, convert_guest

    said = subprocess.run([TOOL, "--version"], capture_output=True, text=True, check=True)
    version = said.stdout.split()[-1]
    cached = guest_disk.parent / f"converted-{version}.qcow2"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(dir=guest_disk.parent) as work:
        disk = Path(work) / "guest.qcow2"
        qemu_img.convert(qemu_img.DiskSource(guest_disk, "raw"), disk, output_format="qcow2")
        vm = VMInfo(identifier="guest", name="guest", provider="local", memory_mb=1024)
        convert_guest(vm, [ConvertedDisk(source="guest", path=disk, format="qcow2",
                                         virtual_size=guest_disk.stat().st_size,
                                         actual_size=0, seconds=0)],
                      uri=libvirt_uri, log_file=Path(work) / "v2v.log", timeout=1800)
        disk.chmod(0o644)
        disk.rename(cached)
    return cached


def wait_for_job(client: httpx.Client, job_id: str, *, timeout: float = 120,
                 statuses: tuple[str, ...] = ("completed", "failed", "cancelled")) -> dict:
    def finished() -> dict | None:
        info = client.get("/jobs/query", params={"job_id": job_id}).json()
        return info if info["status"] in statuses else None

    return wait_until(finished, timeout=timeout, interval=0.5, what=f"job {job_id}")


def job_logs(client: httpx.Client, job_id: str) -> list[str]:
    return [line["message"] for line in client.get(f"/jobs/logs/{job_id}").json()["logs"]]


class Daemons:
    """The daemons a test starts, over one set of directories; all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Daemon] = []

    def start(self, *, extra_daemon: str = "", workers: int = 4) -> Daemon:
        daemon = start_daemon(self.root, api_key="crash-key", embedded=True,
                              extra_daemon=extra_daemon, workers=workers)
        self.started.append(daemon)
        return daemon

    def restart(self, daemon: Daemon) -> Daemon:
        """hypervisord started again over the same directories and config."""
        again = start_daemon(self.root, api_key=daemon.api_key, embedded=True,
                             config=daemon.config)
        self.started.append(again)
        return again

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
                daemon.process.wait(timeout=120)


@pytest.fixture
def daemons(libvirt_uri: str, tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path / "daemon")
    yield started
    started.stop_all()


@pytest.fixture(scope="module")
def module_daemon(libvirt_uri: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with its own Prefect server for a module's tests (each start costs
    ~15 s), SIGTERMed at the end."""
    started = Daemons(tmp_path_factory.mktemp("module") / "daemon")
    started.root.parent.chmod(0o711)  # qemu passes through to the images
    yield started.start()
    started.stop_all()


@pytest.fixture
def editable_daemon(module_daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon, for a test that changes its config (`configure`): restored
    after the test."""
    config = module_daemon.config.read_text()
    yield module_daemon
    module_daemon.config.write_text(config)


def configure(daemon: Daemon, **hyper2kvm: Any) -> None:
    """Change the daemon's hyper2kvm settings; the next flow run reads them."""
    config = yaml.safe_load(daemon.config.read_text())
    config["hyper2kvm"].update(hyper2kvm)
    daemon.config.write_text(yaml.safe_dump(config))
