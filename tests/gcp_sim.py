"""The GCP test peers: gcp-storage-emulator (PyPI, in the venv) for the objects' bytes,
behind the fault proxy of tests/fault_proxy.py, and the Compute + Cloud Build stand-in of
tests/gcp_standin.py for the control plane, both for the session."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.fault_proxy import Faults, start_proxy
from tests.gcp_standin import StandIn, start_standin
from tests.peers import free_port, wait_until

BUCKET = "hypersdk-exports"


@dataclass
class GCP:
    standin: StandIn
    emulator: subprocess.Popen
    storage_endpoint: str  # the emulator itself
    proxy: ThreadingHTTPServer
    faults: Faults

    @property
    def project(self) -> str:
        return self.standin.state.project

    @property
    def proxied_storage(self) -> str:
        return f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def objects(self) -> list[str]:
        client = storage.Client(project=self.project, credentials=AnonymousCredentials(),
                                client_options=ClientOptions(api_endpoint=self.storage_endpoint))
        return [blob.name for blob in client.list_blobs(BUCKET)]

    def section(self, **overrides: object) -> dict[str, object]:
        return {"project": self.project, "credentials_file": str(self.standin.key_file),
                "export_bucket": BUCKET, "compute_endpoint": self.standin.url,
                "cloudbuild_endpoint": self.standin.url,
                "resourcemanager_endpoint": self.standin.url,
                "artifactregistry_endpoint": self.standin.url,
                "storage_endpoint": self.proxied_storage, **overrides}

    def config_section(self) -> str:
        return "  gcp:\n" + "".join(f'    {k}: "{v}"\n' for k, v in self.section().items())

    def stop(self) -> None:
        self.standin.stop()
        self.proxy.shutdown()
        self.emulator.kill()
        self.emulator.wait()


def start_gcp() -> GCP:
    """The emulator, its bucket, the fault proxy and the stand-in. The stand-in's builds
    write straight into the emulator; the provider reads through the proxy (`section`),
    or from the emulator itself with `storage_endpoint=gcp.storage_endpoint`."""
    port = free_port()
    emulator_bin = Path(sys.executable).with_name("gcp-storage-emulator")
    emulator = subprocess.Popen(
        [str(emulator_bin if emulator_bin.exists() else shutil.which("gcp-storage-emulator")),
         "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=60, what="gcp-storage-emulator")
    endpoint = f"http://127.0.0.1:{port}"
    faults = Faults()
    server = start_proxy(port, faults)
    standin = start_standin(storage_endpoint=endpoint, port=free_port())
    storage.Client(project=standin.state.project, credentials=AnonymousCredentials(),
                   client_options=ClientOptions(api_endpoint=endpoint)).create_bucket(BUCKET)
    return GCP(standin=standin, emulator=emulator, storage_endpoint=endpoint, proxy=server,
               faults=faults)


@pytest.fixture(scope="session")
def gcp() -> Iterator[GCP]:
    peers = start_gcp()
    yield peers
    peers.stop()
