"""The Azure test peers: Azurite (the Azure Storage emulator, npm, installed once per
machine by scripts/setup.sh --tests) for the disks' bytes, and the ARM stand-in of
tests/azure_arm_standin.py for the control plane, both for the session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.azure_arm_standin import CLIENT_ID, TENANT, StandIn, start_standin
from tests.fault_proxy import Faults, start_proxy
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
