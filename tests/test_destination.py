"""The destination is checked before the copy (tasks.validate.check_destination,
hyper2kvm.destination): a NIC on a network that cannot start, an output folder without
room, a domain name already taken, each refused before any byte moves, with a message
that names the thing and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import libvirt
import pytest

from core.models import NicInfo, VMInfo
from hyper2kvm.destination import firmware_problem, size_warnings
from hyper2kvm.sample import make_sample_ova
from tests.helpers import domain_defined, domain_xml, make_random_raw, start_and_stop
from tests.peers import LIBVIRT_URI, Daemon, configure, unique, wait_for_job


@pytest.fixture
def inactive_network(libvirt_uri: str) -> Iterator[str]:
    """A libvirt network that is defined but neither active nor set to autostart (as
    libvirt's `default` is on these machines)."""
    name = unique("net")[:15]
    conn = libvirt.open(libvirt_uri)
    network = conn.networkDefineXML(f"<network><name>{name}</name><bridge name='{name}'/>"
                                    "</network>")
    try:
        yield name
    finally:
        network.undefine()
        conn.close()


def submit(client: httpx.Client, name: str, **integration: object) -> httpx.Response:
    return client.post("/jobs/submit", json={"vm_identifier": name,
                                             "hyper2kvm_integration": integration})


def nothing_copied(daemon: Daemon, name: str) -> None:
    assert not (daemon.exports / name).exists()
    assert not (daemon.images / name).exists()


def test_a_nic_on_an_inactive_network_fails_in_validate_before_any_byte_moves(
        editable_daemon: Daemon, inactive_network: str) -> None:
    daemon = editable_daemon
    configure(daemon, network=inactive_network)
    name = unique("netdown")
    make_sample_ova(daemon.inbox, name, mac="00:50:56:ab:cd:ef")
    with daemon.client() as client:
        answer = submit(client, name)
        assert answer.status_code == 200, answer.text
        job_id = answer.json()["job_id"]
        info = wait_for_job(client, job_id)
        phase = client.get(f"/jobs/progress/{job_id}").json()["phase"]
    assert info["status"] == "failed"
    assert (f"NIC 1 (00:50:56:ab:cd:ef, source network 'VM Network') maps to libvirt network "
            f"'{inactive_network}', which is not active on {LIBVIRT_URI}: `virsh net-start "
            f"{inactive_network}`") in info["error"], info["error"]
    assert "hyper2kvm.network_map" in info["error"]
    assert phase in ("validate", "pending"), phase  # no export, no convert began
    nothing_copied(daemon, name)

    # mapped to user-mode networking, the same VM migrates and its domain starts
    configure(daemon, network=inactive_network, network_map={"VM Network": "user"})
    with daemon.client() as client:
        # the sample has no OS to boot: the start as defined is what is checked here
        info = wait_for_job(client, submit(client, name, verify_boot="warn",
                                           boot_timeout=5).json()["job_id"], timeout=300)
    assert info["status"] == "completed", info["error"]
    assert info["result"]["boot"]["starts"] is True, info["result"]["boot"]
    assert start_and_stop(name), "the migrated domain does not start"


def test_a_domain_that_cannot_start_as_defined_fails_the_boot_check(
        editable_daemon: Daemon, inactive_network: str) -> None:
    """A network set to autostart passes validate (it is active after libvirt's next
    start) but is not active now: the boot check starts the domain as defined, paused,
    and sees it cannot start."""
    daemon = editable_daemon
    conn = libvirt.open(LIBVIRT_URI)
    try:
        conn.networkLookupByName(inactive_network).setAutostart(1)
    finally:
        conn.close()
    configure(daemon, network=inactive_network)
    name = unique("nostart")
    make_sample_ova(daemon.inbox, name)
    with daemon.client() as client:
        failed = wait_for_job(client, submit(client, name, verify_boot="require").json()[
            "job_id"], timeout=300)
        assert failed["status"] == "failed"
        assert (f"domain {name!r} as defined does not start on {LIBVIRT_URI}"
                in failed["error"]), failed["error"]
        assert f"network '{inactive_network}' is not active" in failed["error"]
        assert not domain_defined(name)  # require: not left defined

        warned = wait_for_job(client, submit(client, name, verify_boot="warn",
                                             replace_existing=True).json()["job_id"],
                              timeout=300)
    assert warned["status"] == "completed", warned["error"]
    boot = warned["result"]["boot"]
    assert boot["starts"] is False and boot["watched"] is False, boot
    assert any("as defined does not start" in warning
               for warning in warned["result"]["warnings"]), warned["result"]["warnings"]
    assert domain_defined(name)


def test_a_full_output_folder_fails_in_validate(editable_daemon: Daemon,
                                                tmp_path: Path) -> None:
    daemon = editable_daemon
    full = tmp_path / "small"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        configure(daemon, output_dir=str(full))
        name = unique("nospace")
        make_random_raw(daemon.inbox, name, 8)  # 8 MiB of data: more than 1 MiB of room
        with daemon.client() as client:
            info = wait_for_job(client, submit(client, name).json()["job_id"])
        assert info["status"] == "failed"
        assert f"{full} has 0.00 GiB free, the disks need 0.01 GiB" in info["error"], info
        assert list(full.iterdir()) == []
        assert not (daemon.exports / name).exists()
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_taken_domain_name_is_a_409_at_submit(api: httpx.Client, daemon: Daemon) -> None:
    name = unique("taken")
    make_sample_ova(daemon.inbox, name)
    conn = libvirt.open(LIBVIRT_URI)
    try:
        conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory>65536</memory>"
                       "<os><type arch='x86_64'>hvm</type></os></domain>")
        answer = submit(api, name)
        assert answer.status_code == 409, answer.text
        assert answer.json()["message"] == (
            f"a libvirt domain named {name!r} already exists on {LIBVIRT_URI}; set "
            "hyper2kvm_integration.replace_existing to replace it")
        answer = submit(api, name, replace_existing=True)
        assert answer.status_code == 200, answer.text
        assert wait_for_job(api, answer.json()["job_id"])["status"] == "completed"
    finally:
        if domain_defined(name):
            conn.lookupByName(name).undefine()
        conn.close()


OVMF = Path("/usr/share/OVMF")


def test_a_uefi_vm_without_its_firmware_fails_in_validate_and_with_it_starts(
        editable_daemon: Daemon, tmp_path: Path) -> None:
    daemon = editable_daemon
    missing = tmp_path / "OVMF_CODE_4M.fd"  # the firmware path pointed elsewhere
    configure(daemon, uefi_firmware={"code": str(missing),
                                     "vars": str(OVMF / "OVMF_VARS_4M.fd")})
    name = unique("uefi")
    make_sample_ova(daemon.inbox, name, firmware="efi")
    with daemon.client() as client:
        failed = wait_for_job(client, submit(client, name).json()["job_id"])
        assert failed["status"] == "failed"
        assert (f"{name} boots with UEFI and hyper2kvm.uefi_firmware.code {missing} is not "
                "a file") in failed["error"], failed["error"]
        nothing_copied(daemon, name)

        configure(daemon, uefi_firmware={"code": str(OVMF / "OVMF_CODE_4M.fd"),
                                         "vars": str(OVMF / "OVMF_VARS_4M.fd")})
        # nothing on the disk to boot: OVMF ends at its shell, which ends the check
        done = wait_for_job(client, submit(client, name, verify_boot="warn").json()[
            "job_id"], timeout=300)
    assert done["status"] == "completed", done["error"]
    assert done["result"]["boot"]["starts"] is True, done["result"]["boot"]
    assert "UEFI shell" in done["result"]["boot"]["reason"], done["result"]["boot"]
    loader = domain_xml(name).find("os/loader")
    assert loader is not None and loader.text == str(OVMF / "OVMF_CODE_4M.fd")
    assert start_and_stop(name)


def test_a_vm_larger_than_this_host_is_a_warning_or_with_strict_a_failure(
        api: httpx.Client, daemon: Daemon) -> None:
    name = unique("huge")
    cpus = os.cpu_count() or 1
    make_sample_ova(daemon.inbox, name, cpus=cpus + 1)
    strict = wait_for_job(api, submit(api, name, strict=True).json()["job_id"])
    assert strict["status"] == "failed"
    assert (f"{name} has {cpus + 1} vCPUs, this host {cpus} CPUs "
            "(hyper2kvm_integration.strict)") in strict["error"], strict["error"]
    nothing_copied(daemon, name)
    warned = wait_for_job(api, submit(api, name).json()["job_id"])
    assert warned["status"] == "completed", warned["error"]
    assert (f"host: {name} has {cpus + 1} vCPUs, this host {cpus} CPUs; the domain is "
            "defined as the source had it") in warned["result"]["warnings"]
    assert domain_xml(name).findtext("vcpu") == str(cpus + 1)


def test_firmware_and_size_of_the_vm_against_this_host(libvirt_uri: str) -> None:
    vm = VMInfo(identifier="big", name="big", provider="local", firmware="efi",
                secure_boot=True, cpus=4096, memory_mb=1 << 30,
                nics=[NicInfo(mac="00:50:56:ab:cd:ef")])
    assert firmware_problem(libvirt_uri, vm, "qemu") is None  # ovmf is installed here
    warnings = size_warnings(libvirt_uri, vm)
    assert len(warnings) == 2 and "4096 vCPUs" in warnings[0], warnings


def test_a_dry_run_answers_what_the_job_would_do_and_its_blockers_and_creates_nothing(
        daemon: Daemon) -> None:
    name = unique("dry")
    make_sample_ova(daemon.inbox, name, cpus=1, mac="00:50:56:ab:cd:01")
    with daemon.client() as client:
        answer = client.post("/jobs/submit", json={"vm_identifier": name, "dry_run": True})
        assert answer.status_code == 200, answer.text
        clean = answer.json()
        assert clean["blockers"] == [], clean["blockers"]
        assert clean["vm"]["name"] == name and clean["vm"]["cpus"] == 1
        assert clean["domain_name"] == name and clean["disk_bytes"] == 64 * 2**20
        assert clean["output_free_bytes"] > 0 and clean["output_dir"]

        left = daemon.images / name / f"{name}-disk1.qcow2"  # an earlier run's output
        left.parent.mkdir()
        left.write_bytes(b"")
        try:
            blocked = client.post("/jobs/submit", json=[
                {"vm_identifier": name, "dry_run": True}]).json()["jobs"][0]
        finally:
            shutil.rmtree(left.parent)
        assert [b["code"] for b in blocked["blockers"]] == ["output_exists"], blocked
        assert "replace_existing" in blocked["blockers"][0]["message"]
        mixed = client.post("/jobs/submit", json=[{"vm_identifier": name, "dry_run": True},
                                                  {"vm_identifier": name}])
        assert mixed.status_code == 422 and "dry_run" in mixed.json()["message"]
        # nothing was created: no job, no export, no output, no domain
        newest = client.get("/jobs/query", params={"limit": 199}).json()["jobs"]
        assert not [job for job in newest if job["vm_identifier"] == name], newest
    nothing_copied(daemon, name)
    assert not domain_defined(name)
