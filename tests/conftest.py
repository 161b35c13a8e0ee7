"""Fixtures live in tests/peers.py (one module, imported once, so the session's ports and
directories are chosen once); pytest finds them through this import."""

from tests.aws_sim import moto  # noqa: F401,E402 - fixtures
from tests.azure_sim import azure  # noqa: F401,E402 - fixtures
from tests.gcp_sim import gcp  # noqa: F401,E402 - fixtures
from tests.hyperv_sim import hyperv  # noqa: F401,E402 - fixtures
from tests.oci_sim import oci_peer  # noqa: F401,E402 - fixtures
from tests.peers import (  # noqa: F401 - fixtures
    api,
    converted_guest,
    daemon,
    daemons,
    editable_daemon,
    guest_disk,
    libvirt_uri,
    module_daemon,
    prefect_server,
    qemu_reaches_tmp_path,
    sample_cache,
    sample_vm,
    session_files,
    tmp_path,
    watch_daemon,
)
from tests.vsphere_sim import si, vcsim, vcsim_proxy, vcsim_upstream  # noqa: F401,E402 - fixtures
