"""The OCI provider against the OCI stand-in (tests/oci_standin.py), driven by the real
oci SDK clients with every request signed by the SDK's signer and checked by the
stand-in: inventory through the REST API, a migration end to end, an object read that
fails then succeeds, block volumes refused unless boot_volume_only, a cancel while the
image export runs, a refused key, a missing instance, a running instance stopped and
started again."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from core.config import Config, OCIProviderConfig
from core.errors import AuthFailed, NotFound, Transient, VerificationError
from core.models import ExportOptions, VMFilter
from hyper2kvm import qemu_img
from hyper2kvm.sample import make_disk
from providers.oci import OCIProvider
from tests.helpers import domain_facts, domain_firmware, start_and_stop
from tests.oci_sim import OCI
from tests.oci_standin import api_key
from tests.peers import EXPORTS, Daemon, free_port, unique, wait_for_job, wait_until
from tests.test_jobs import submit


def _boot(tmp_path: Path, name: str) -> Path:
    boot = tmp_path / "boot.raw"
    make_disk(boot, size_mib=24, hostname=name)
    return boot


def _provider(oci_peer: OCI, **overrides: object) -> OCIProvider:
    return OCIProvider(OCIProviderConfig.model_validate(oci_peer.section(**overrides)),
                       settings=Config())


def _leftovers(oci_peer: OCI, name: str) -> list[str]:
    return ([i["displayName"] for i in oci_peer.standin.images() if name in i["displayName"]]
            + [o for o in oci_peer.standin.objects() if name in o])


def test_inventory_through_the_api(api: httpx.Client, oci_peer: OCI) -> None:
    env = unique("env")
    web = oci_peer.standin.add_instance(
        unique("web"), boot=(2, None), volumes=(1, 3), ocpus=2, memory_gb=16,
        firmware="UEFI_64", secure_boot=True, running=True, tags={"env": env},
        macs=("02:00:17:0a:0b:0c", "02:00:17:0a:0b:0d"))
    arm_name = unique("arm")
    oci_peer.standin.add_instance(arm_name, boot=(1, None), shape="VM.Standard.A1.Flex",
                                  ocpus=3, memory_gb=6, tags={"env": env, "tier": "data"})
    caps = api.get("/capabilities").json()["providers"]["oci"]
    assert caps["configured"] and caps["usable"], caps

    def listed(**flt: object) -> list[str]:
        answer = api.post("/vms/list", json={"provider": "oci", "filter": flt})
        assert answer.status_code == 200, answer.text
        return sorted(v["name"] for v in answer.json()["vms"])

    web_name = oci_peer.standin.state.instances[web]["displayName"]
    assert listed(tags=[f"env={env}"]) == sorted([web_name, arm_name])
    assert listed(tags=[f"env={env}"], status="poweredOn") == [web_name]
    assert listed(tags=[f"env={env}", "tier=data"]) == [arm_name]
    assert listed(tags=[f"env={env}"], name_pattern="arm*") == [arm_name]

    info = api.get("/vms/info", params={"provider": "oci", "identifier": web}).json()
    assert info["cpus"] == 4 and info["memory_mb"] == 16384  # 2 x86 OCPUs = 4 vCPUs
    assert info["firmware"] == "efi" and info["secure_boot"] is True
    assert [d["capacity_bytes"] for d in info["disks"]] == [2 << 30, 1 << 30, 3 << 30]
    assert [n["mac"] for n in info["nics"]] == ["02:00:17:0a:0b:0c", "02:00:17:0a:0b:0d"]
    assert info["nics"][0]["ip_address"] == "10.0.0.10"
    arm = api.get("/vms/info", params={"provider": "oci", "identifier": arm_name}).json()
    assert arm["cpus"] == 3 and arm["architecture"] == "arm64" and arm["firmware"] == "bios"
    missing = api.get("/vms/info", params={"provider": "oci",
                                           "identifier": "ocid1.instance.oc1.iad.nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["message"]
    # a custom image holds the boot volume only: refused before anything starts
    refused = api.post("/jobs/submit", json={"vm_identifier": web, "provider": "oci"})
    assert refused.status_code == 422 and "boot_volume_only" in refused.json()["message"]
    assert "-data1" in refused.json()["message"]


def test_migration_ends_with_matching_domain_and_nothing_left(
        api: httpx.Client, daemon: Daemon, oci_peer: OCI, tmp_path: Path) -> None:
    name = unique("t-oci")
    boot = _boot(tmp_path, name)
    instance = oci_peer.standin.add_instance(name, boot=(1, boot), ocpus=1, memory_gb=1,
                                             firmware="UEFI_64", macs=("02:00:17:aa:00:01",))
    oci_peer.standin.state.fail[0] = 2  # the first object read fails twice, then is served
    job_id = submit(api, vm_identifier=instance, provider="oci",
                    hyper2kvm_integration={"replace_existing": True})
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    assert oci_peer.standin.state.fail[0] == 0, "the failing read was never asked for"
    disk = Path(info["result"]["disks"][0]["path"])
    assert qemu_img.compare(boot, disk), "the domain's disk differs from the boot volume"
    facts = domain_facts(name)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 1024 * 1024
    assert facts["macs"] == ["02:00:17:aa:00:01"]
    assert domain_firmware(name) == "efi"
    assert start_and_stop(name)
    logs = "\n".join(line["message"] for line in
                     api.get(f"/jobs/logs/{job_id}").json()["logs"])
    assert "CRC32C checked" in logs and "(2 range reads retried)" in logs
    assert "work request" in logs and "SUCCEEDED" in logs
    assert _leftovers(oci_peer, name) == []
    assert oci_peer.standin.state.unsigned == 0


def test_cancel_during_the_image_export_leaves_nothing(
        api: httpx.Client, daemon: Daemon, oci_peer: OCI, tmp_path: Path) -> None:
    name = unique("t-oci-cancel")
    instance = oci_peer.standin.add_instance(name, boot=(1, _boot(tmp_path, name)))
    oci_peer.standin.state.export_seconds = 15
    try:
        job_id = submit(api, vm_identifier=instance, provider="oci")

        def exporting() -> bool:
            return any(w["status"] == "IN_PROGRESS"
                       for w in oci_peer.standin.state.work_requests.values())

        wait_until(exporting, timeout=120, what="the image export to run")
        assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
        assert wait_for_job(api, job_id, timeout=120)["status"] == "cancelled"
    finally:
        oci_peer.standin.state.export_seconds = 0.3
    # the export cannot be stopped: once it ends, its image and object are removed
    wait_until(lambda: not _leftovers(oci_peer, name), timeout=90,
               what="the image and the object to be removed")
    assert not [p for p in EXPORTS.rglob(f"*{name}*") if p.is_file()]


def test_running_instance_stopped_exported_boot_volume_only_and_started_again(
        oci_peer: OCI, tmp_path: Path) -> None:
    name = unique("t-oci-run")
    boot = _boot(tmp_path, name)
    instance = oci_peer.standin.add_instance(name, boot=(1, boot), volumes=(1,), running=True)
    states: list[str] = []

    def progress(count: int) -> None:
        states.append(oci_peer.standin.state_of(instance))

    result = _provider(oci_peer).export(
        instance, tmp_path / "out", method="ova", progress=progress, job="run-job",
        options=ExportOptions(shutdown_vm=True, restore_power_state=True,
                              boot_volume_only=True))
    assert oci_peer.standin.state_of(instance) == "RUNNING"
    assert oci_peer.standin.state.captured[-1] == (instance, "STOPPED")  # imaged while off
    assert states and set(states) == {"RUNNING"}  # started again once the image was taken
    assert [f.role for f in result.files] == ["ova"]
    assert len(result.vm.disks) == 1
    assert _leftovers(oci_peer, name) == []


def test_refused_key_missing_instance_and_unreachable_endpoint(oci_peer: OCI,
                                                               tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(api_key()[0])
    with pytest.raises(AuthFailed, match="NotAuthenticated"):
        _provider(oci_peer, key_file=str(stranger)).list_vms(VMFilter())
    assert oci_peer.standin.state.unsigned > 0
    with pytest.raises(NotFound, match="nope"):
        _provider(oci_peer).get_vm("ocid1.instance.oc1.iad.nope")
    with pytest.raises(NotFound, match="no instance 'nobody-has-this-name'"):
        _provider(oci_peer).get_vm("nobody-has-this-name")
    with pytest.raises(Transient, match="cannot reach OCI"):
        _provider(oci_peer, compute_endpoint=f"http://127.0.0.1:{free_port()}").list_vms(
            VMFilter())
    key = (tmp_path / "key.pem")
    key.write_bytes(oci_peer.standin.key_file.read_bytes())
    provider = _provider(oci_peer, key_file=None, key_content=key.read_text())
    assert provider.list_vms(VMFilter()) is not None
    assert key.read_text() not in repr(provider.config)


def test_an_instance_deaf_to_softstop_is_powered_off_after_the_shutdown_timeout(
        oci_peer: OCI, tmp_path: Path) -> None:
    """SOFTSTOP asks the OS; one that does not answer stays STOPPING. After
    shutdown_timeout the export powers it off (STOP), as the option promises; a wait that
    ran out is not "bad credentials"."""
    name = unique("t-oci-deaf")
    instance = oci_peer.standin.add_instance(name, boot=(1, _boot(tmp_path, name)),
                                             running=True)
    oci_peer.standin.state.deaf.add(instance)
    result = _provider(oci_peer).export(
        instance, tmp_path / "out", method="ova", job="deaf-job",
        options=ExportOptions(shutdown_vm=True, shutdown_timeout=3))
    assert [a for i, a in oci_peer.standin.state.actions if i == instance] == [
        "SOFTSTOP", "STOP"]
    assert oci_peer.standin.state.captured[-1] == (instance, "STOPPED")
    assert [f.role for f in result.files] == ["ova"]
    assert _leftovers(oci_peer, name) == []


def test_a_multipart_object_is_checked_by_its_crc32c(oci_peer: OCI, tmp_path: Path) -> None:
    """An image export lands as a multipart object: no Content-MD5 to check. Its
    opc-content-crc32c covers the whole object: a byte flipped on the way is caught."""
    state = oci_peer.standin.state
    name = unique("t-oci-multi")
    instance = oci_peer.standin.add_instance(name, boot=(1, _boot(tmp_path, name)))
    state.multipart_above, state.corrupt = 64 << 10, {0}
    try:
        with pytest.raises(VerificationError, match="crc32c"):
            _provider(oci_peer).export(instance, tmp_path / "bad", method="ova",
                                       job="multi-bad", options=ExportOptions())
        state.corrupt = set()
        result = _provider(oci_peer).export(instance, tmp_path / "out", method="ova",
                                            job="multi-job", options=ExportOptions())
    finally:
        state.multipart_above, state.corrupt = 1 << 40, set()
    assert [f.role for f in result.files] == ["ova"]
    assert not list((tmp_path / "bad").glob("*"))
    assert _leftovers(oci_peer, name) == []


def test_block_volumes_without_boot_volume_only_are_a_dry_run_blocker(
        api: httpx.Client, oci_peer: OCI, tmp_path: Path) -> None:
    name = unique("t-oci-dry")
    instance = oci_peer.standin.add_instance(name, boot=(1, _boot(tmp_path, name)),
                                             volumes=(1,))
    dry = api.post("/jobs/submit", json={"vm_identifier": instance, "provider": "oci",
                                         "dry_run": True}).json()
    assert [b["code"] for b in dry["blockers"]] == ["export_not_possible"], dry
    assert "boot_volume_only" in dry["blockers"][0]["message"]
    assert len(dry["vm"]["disks"]) == 2
    assert _leftovers(oci_peer, name) == []  # no image made
    clear = api.post("/jobs/submit", json={"vm_identifier": instance, "provider": "oci",
                                           "dry_run": True,
                                           "options": {"boot_volume_only": True}}).json()
    assert clear["blockers"] == [], clear


def test_a_retry_after_a_busy_range_reuses_the_image_the_export_and_the_ranges_read(
        oci_peer: OCI, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A range of the exported object stays busy past its retries and a budget of 0 s: the
    export fails transiently and keeps its image, its exported object and the ranges it
    read. The same job again makes no image, exports nothing, and reads only the rest."""
    state = oci_peer.standin.state
    name = unique("t-oci-resume")
    boot = _boot(tmp_path, name)
    instance = oci_peer.standin.add_instance(name, boot=(1, boot))
    job = unique("resume-job")
    reading = {"chunk_size": 128 << 10, "part_concurrency": 1}  # the object: ~900 KiB
    impatient = Config.model_validate({"export": {"throttle_budget": 0, "part_retries": 1,
                                                  **reading}})
    state.fail[256 << 10] = 2
    caplog.set_level("INFO")
    try:
        with pytest.raises(Transient):
            OCIProvider(OCIProviderConfig.model_validate(oci_peer.section()),
                        settings=impatient).export(instance, tmp_path / "out",
                                                   method="disks", job=job,
                                                   options=ExportOptions())
    finally:
        state.fail.clear()
    assert len(_leftovers(oci_peer, name)) == 2  # the image and its exported object, kept
    result = OCIProvider(OCIProviderConfig.model_validate(oci_peer.section()),
                         settings=Config.model_validate({"export": reading})).export(
        instance, tmp_path / "out", method="disks", job=job, options=ExportOptions())
    disk = next(f.path for f in result.files if f.role == "disk")
    assert qemu_img.compare(boot, disk)
    assert "the image an earlier attempt made is used again" in caplog.text
    assert "the export object an earlier attempt made is used again" in caplog.text
    assert f"resuming after the {256 << 10} bytes" in caplog.text
    assert caplog.text.count("export to") == 1, caplog.text  # one image export, by the first
    assert _leftovers(oci_peer, name) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [disk.name]
