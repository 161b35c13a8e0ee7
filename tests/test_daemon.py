"""hypervisord as a process: auth, health, capabilities, loopback without a key, and the
seed's own integration script."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import domain_defined
from tests.peers import ROOT, Daemon, start_daemon, stop_daemon, wait_for_job

SEED = ROOT.parent / "shared" / "seed" / "hypersdk-hyper2kvm-integration.txt"


def test_health_needs_no_key_and_reports_prefect(daemon: Daemon) -> None:
    with daemon.client(key=None) as anonymous:
        health = anonymous.get("/health").json()
    assert health["status"] == "healthy" and health["version"]
    assert health["prefect"]["reachable"] is True


def test_every_other_endpoint_needs_the_key(daemon: Daemon) -> None:
    with daemon.client(key=None) as anonymous:
        for method, path in (("GET", "/capabilities"), ("POST", "/vms/list"),
                             ("POST", "/jobs/submit"), ("GET", "/jobs/query")):
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (path, response.text)
            assert "API key" in response.json()["message"]
    with daemon.client(key="wrong") as wrong:
        assert wrong.get("/capabilities").status_code == 401
    with httpx.Client(base_url=daemon.url, headers={"X-API-Key": daemon.api_key or ""}) as c:
        assert c.get("/capabilities").status_code == 200


def test_capabilities(api: httpx.Client) -> None:
    caps = api.get("/capabilities").json()
    assert caps["providers"]["local"] == {"configured": True, "usable": True}
    assert caps["export_methods"] == ["ova", "ovf", "vmdk"]
    assert caps["formats"] == ["qcow2", "raw"]
    assert re.match(r"\d+\.\d+", caps["qemu_img"])
    assert re.match(r"\d+\.\d+\.\d+", caps["libvirt"]["version"])


def test_openapi_is_served(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    for path in ("/jobs/submit", "/jobs/query", "/jobs/progress/{job_id}", "/vms/list"):
        assert path in spec["paths"]
    assert api.get("/docs").status_code == 200


@pytest.fixture(scope="module")
def open_daemon(daemon: Daemon) -> Iterator[Daemon]:
    """A second hypervisord without a key and asked to listen on 0.0.0.0, not running
    flows itself (--no-serve): jobs it accepts run on the first daemon's runner, as on a
    shared Prefect server with workers."""
    running = start_daemon(daemon.root, api_key=None, args=("--no-serve",),
                           config_name="config-open.yaml", host="0.0.0.0")
    yield running
    assert stop_daemon(running) == 0


def test_without_a_key_it_listens_on_loopback_only(open_daemon: Daemon) -> None:
    log = open_daemon.log.read_text()
    assert "listening on 127.0.0.1 only" in log
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    port = open_daemon.url.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening


@pytest.mark.skipif(not SEED.exists(), reason="the seed document is not beside the repo")
def test_the_seeds_integration_script_runs_unchanged(open_daemon: Daemon, sample_vm: str,
                                                     watch_daemon: object,
                                                     tmp_path: Path) -> None:
    """Steps 1-4 of the seed's test-integration.sh, verbatim but for the daemon URL, the VM
    and the provider (vSphere comes with its own issue). Step 5 needs systemd."""
    text = SEED.read_text()
    script = text[text.index("#!/bin/bash"):text.index("# 5. Check hyper2kvm conversion")]
    script = (script.replace('DAEMON_URL="http://localhost:8080"',
                             f'DAEMON_URL="{open_daemon.url}"')
                    .replace('VM_ID="test-vm-001"', f'VM_ID="{sample_vm}"')
                    .replace('"provider": "vsphere"', '"provider": "local"')
                    .replace('\\"provider\\": \\"vsphere\\"', '\\"provider\\": \\"local\\"'))
    assert script.count('"local') == 2, "the seed script changed shape"
    file = tmp_path / "test-integration.sh"
    file.write_text(script)
    done = subprocess.run(["bash", str(file)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Export completed successfully!" in done.stdout
    assert re.search(r"Status: completed - Progress: 100(\.0)?%", done.stdout)
    job_id = re.search(r"Job submitted: (\S+)", done.stdout).group(1)
    with open_daemon.client() as client:
        assert wait_for_job(client, job_id)["status"] == "completed"
    # daemon_mode: true in the script: hyper2kvm@vsphere converted and registered it
    assert (open_daemon.watch / "vsphere" / "done" / f"{job_id}.result.json").exists()
    assert domain_defined(sample_vm)


def test_capabilities_says_usable_only_after_a_real_check(tmp_path: Path) -> None:
    """A vSphere whose address answers nothing is configured but not usable."""
    from tests.peers import free_port

    daemon = start_daemon(tmp_path / "unreachable", api_key="caps-key", args=("--no-serve",),
                          vsphere=f"127.0.0.1:{free_port()}")
    try:
        with daemon.client() as client:
            caps = client.get("/capabilities").json()["providers"]
        assert caps["vsphere"]["configured"] is True
        assert caps["vsphere"]["usable"] is False and caps["vsphere"]["reason"]
        assert caps["local"]["usable"] is True
    finally:
        assert stop_daemon(daemon) == 0
