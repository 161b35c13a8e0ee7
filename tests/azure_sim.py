"""The Azure test peers: Azurite (the Azure Storage emulator, npm, installed once per
machine by scripts/setup.sh --tests) for the disks' bytes, and the ARM stand-in of
tests/azure_arm_standin.py for the control plane, both for the session."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.azure_arm_standin import CLIENT_ID, TENANT, StandIn, start_standin
from tests.peers import free_port, wait_until
from tests.vsphere_sim import server_certificate

AZURITE_DIR = Path(os.environ.get("HYPERSDK_AZURITE_DIR") or (
    "/var/cache/hypersdk/azurite" if os.geteuid() == 0 else
    Path.home() / ".cache" / "hypersdk" / "azurite"))
AZURITE_VERSION = "3.35.0"
SECRET_ENV = "AZURE_TEST_CLIENT_SECRET"


def install_azurite() -> Path:
    """azurite-blob, installed with npm into the machine's cache when missing."""
    binary = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        AZURITE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                        f"azurite@{AZURITE_VERSION}"], cwd=AZURITE_DIR, check=True,
                       timeout=600)
    return binary


@dataclass
class Faults:
    """What the proxy in front of Azurite does to ranged reads: fail the read of a range
    starting at an offset N times (503), or delay every ranged read."""

    fail: dict[int, int] = field(default_factory=dict)  # range start -> failures left
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def should_fail(self, start: int) -> bool:
        with self.lock:
            left = self.fail.get(start, 0)
            if left:
                self.fail[start] = left - 1
            return left > 0


def start_proxy(upstream_port: int, faults: Faults) -> ThreadingHTTPServer:
    """An HTTP proxy to Azurite: every byte still comes from the emulator; `faults` says
    which ranged reads fail or crawl (Azurite itself never fails)."""

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ranged = self.headers.get("x-ms-range") or self.headers.get("Range") or ""
            if self.command == "GET" and ranged.startswith("bytes="):
                if faults.delay:
                    time.sleep(faults.delay)
                if faults.should_fail(int(ranged[6:].split("-")[0])):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{upstream_port}"
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                head = self.command == "HEAD"  # its Content-Length is the blob's
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection") and (
                            head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                upstream.close()

        do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True, name="azurite-proxy").start()
    return server


@dataclass
class Azure:
    standin: StandIn
    azurite: subprocess.Popen
    blob_endpoint: str
    location: Path
    proxy: ThreadingHTTPServer
    faults: Faults

    @property
    def secret(self) -> str:
        return self.standin.state.secret

    @property
    def subscription(self) -> str:
        return self.standin.state.subscription

    def config_section(self) -> str:
        return (f'  azure:\n    subscription_id: "{self.subscription}"\n'
                f'    tenant_id: "{TENANT}"\n    client_id: "{CLIENT_ID}"\n'
                f'    client_secret: "${{{SECRET_ENV}}}"\n'
                f'    arm_endpoint: "{self.standin.url}"\n'
                f'    authority: "{self.standin.url}"\n    ca_file: "{self.standin.ca}"\n')

    def stop(self) -> None:
        self.standin.stop()
        self.proxy.shutdown()
        self.azurite.kill()
        self.azurite.wait()
        shutil.rmtree(self.location, ignore_errors=True)


def start_azure(*, proxy: bool = True) -> Azure:
    """Azurite and the stand-in; SAS URLs point at a fault-injecting proxy in front of
    Azurite unless `proxy` is false (benchmarks read from Azurite itself)."""
    binary = install_azurite()
    location = Path(tempfile.mkdtemp(prefix="azurite-", dir="/var/tmp"))
    port = free_port()
    azurite = subprocess.Popen(
        [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
         str(location), "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}/devstoreaccount1"

    def listening() -> bool:
        import socket

        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=60, what="azurite")
    faults = Faults()
    server = start_proxy(port, faults)
    cert, key = server_certificate()
    # the stand-in writes disks to Azurite directly and hands out SAS URLs via the proxy
    standin = start_standin(blob_endpoint=endpoint, cert=cert, key=key, port=free_port(),
                            sas_endpoint=f"http://127.0.0.1:{server.server_address[1]}"
                            "/devstoreaccount1" if proxy else endpoint)
    os.environ[SECRET_ENV] = standin.state.secret
    return Azure(standin=standin, azurite=azurite, blob_endpoint=endpoint, location=location,
                 proxy=server, faults=faults)


@pytest.fixture(scope="session")
def azure() -> Iterator[Azure]:
    peers = start_azure()
    yield peers
    peers.stop()
