"""The OCI test peer: the stand-in of tests/oci_standin.py (control plane and Object
Storage; no OCI emulator exists), for the session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.oci_standin import StandIn, start_standin
from tests.peers import free_port

BUCKET = "hypersdk-exports"


@dataclass
class OCI:
    standin: StandIn

    def section(self, **overrides: object) -> dict[str, object]:
        state = self.standin.state
        return {"tenancy": state.tenancy, "user": state.user,
                "fingerprint": state.fingerprint, "key_file": str(self.standin.key_file),
                "region": "us-ashburn-1", "export_bucket": BUCKET,
                "compute_endpoint": self.standin.url,
                "objectstorage_endpoint": self.standin.url, **overrides}

    def config_section(self) -> str:
        return "  oci:\n" + "".join(f'    {k}: "{v}"\n' for k, v in self.section().items())


@pytest.fixture(scope="session")
def oci_peer() -> Iterator[OCI]:
    standin = start_standin(port=free_port())
    yield OCI(standin)
    standin.stop()
