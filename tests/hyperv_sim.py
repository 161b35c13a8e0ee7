"""The Hyper-V test peers: a real Samba server (Debian's smbd as a plain process on a free
loopback port, a test user made with smbpasswd) serving the share the stand-in host's
disks live in, behind a TCP proxy that can slow the share down or cut its connections;
and the WinRM stand-in of tests/hyperv_standin.py."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hyperv_standin import HOST_PATH, SHARE_NAME, SHARE_PATH, Host, StandIn, start_standin
from tests.peers import SESSION_DIR, free_port, wait_until
from tests.tcp_proxy import Throttle, start_proxy
from tests.vsphere_sim import server_certificate

SMB_USER = "hypersdk-smb"  # a system account made for the share (Samba maps to it)
SMB_PASSWORD = "Sm8-share-pw"
WINRM_USER = "hv-admin"
WINRM_PASSWORD = "Hv-winrm-pw1"
SHARE = SHARE_NAME

_CONF = """[global]
  smb ports = {port}
  interfaces = lo
  bind interfaces only = yes
  server role = standalone server
  server min protocol = SMB3
  pid directory = {root}/run
  lock directory = {root}/lock
  state directory = {root}/state
  cache directory = {root}/cache
  private dir = {root}/private
  ncalrpc dir = {root}/lock/ncalrpc
  passdb backend = tdbsam:{root}/private/passdb.tdb
  log file = {root}/smbd.log
  log level = 1
  map to guest = never
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
[{share}]
  path = {share_dir}
  read only = no
  valid users = {user}
  force user = root
"""


def start_samba(root: Path, share_dir: Path) -> tuple[subprocess.Popen, int]:
    """smbd serving `share_dir` as //127.0.0.1:PORT/hyperv to SMB_USER."""
    if subprocess.run(["id", SMB_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", SMB_USER], check=True)
    for name in ("run", "lock", "state", "cache", "private"):
        (root / name).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = root / "smb.conf"
    conf.write_text(_CONF.format(port=port, root=root, share=SHARE, share_dir=share_dir,
                                 user=SMB_USER))
    subprocess.run(["smbpasswd", "-c", str(conf), "-a", "-s", SMB_USER],
                   input=f"{SMB_PASSWORD}\n{SMB_PASSWORD}\n", text=True, check=True,
                   capture_output=True)
    # its own session: smbd signals its whole process group when it stops
    process = subprocess.Popen(["smbd", "-F", "--no-process-group", "-s", str(conf)],
                               stdout=(root / "smbd.out").open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    wait_until(listening, timeout=30, what="smbd")
    return process, port


@dataclass
class HyperV:
    standin: StandIn
    smb_port: int  # the proxy's
    direct_port: int  # smbd's own
    throttle: Throttle
    ca_file: Path

    @property
    def host(self) -> Host:
        return self.standin.host

    def section(self, **overrides: object) -> dict[str, object]:
        return {"host": self.standin.address, "username": WINRM_USER,
                "password": WINRM_PASSWORD, "transport": "ntlm", "ca_file": str(self.ca_file),
                "export_share": f"smb://127.0.0.1:{self.smb_port}/{SHARE}",
                "share_path": SHARE_PATH, "share_username": SMB_USER,
                "share_password": SMB_PASSWORD, **overrides}

    def config_section(self) -> str:
        return "  hyperv:\n" + "".join(f"    {k}: {json.dumps(str(v))}\n"
                                        for k, v in self.section().items())

    def staging(self) -> list[str]:
        """What is left in the share's staging folder."""
        folder = self.host.share_dir / "hypersdk"
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if (
            folder.exists()) else []


@pytest.fixture(scope="session")
def hyperv() -> Iterator[HyperV]:
    root = SESSION_DIR / "hyperv"
    share_dir, host_dir, private_dir = root / "share", root / "host", root / "private-state"
    for folder in (share_dir, host_dir, private_dir):
        folder.mkdir(parents=True, exist_ok=True)
    samba, port = start_samba(root / "samba", share_dir)
    throttle = Throttle()
    proxy_port = start_proxy(port, throttle)
    cert, key = server_certificate()
    standin = start_standin(Host(share_dir=share_dir, host_dir=host_dir,
                                 private_dir=private_dir),
                            cert=cert, key=key, port=free_port(), username=WINRM_USER,
                            password=WINRM_PASSWORD, users_file=root / "ntlm-users")
    yield HyperV(standin=standin, smb_port=proxy_port, direct_port=port, throttle=throttle,
                 ca_file=cert)
    standin.stop()
    samba.terminate()
    samba.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)


__all__ = ["HOST_PATH", "SHARE_PATH", "HyperV", "hyperv"]
