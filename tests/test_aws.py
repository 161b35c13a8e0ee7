"""The AWS provider against moto's server (tests/moto_extensions.py adds what moto lacks):
inventory through the REST API, migrations over both transports end to end, and the bad
days: a block that fails, a block whose checksum lies, a cancel mid-download, refused
credentials, an instance that is not there, an arm64 instance, VM Export's limits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.config import AWSProviderConfig, Config
from core.errors import AuthFailed, NotFound, ProviderError, Transient
from core.models import ExportOptions, VMFilter
from hyper2kvm import qemu_img
from hyper2kvm.sample import make_disk
from providers.aws import AWSProvider
from tests.aws_sim import BUCKET, REGION, VM_EXPORT_GRANTEE, Moto, grant_vm_export
from tests.helpers import domain_facts, domain_firmware, source_disk_as_raw, start_and_stop
from tests.peers import EXPORTS, Daemon, free_port, unique, wait_for_job, wait_until
from tests.test_jobs import submit


def _disks(tmp_path: Path, name: str) -> list[Path]:
    """A guest-like boot disk (GPT + ext4) and a data disk with a hole in the middle."""
    boot, data = tmp_path / "boot.raw", tmp_path / "data.raw"
    make_disk(boot, size_mib=24, hostname=name)
    with data.open("wb") as out:
        out.write(b"data disk " * (1 << 20))  # 10 MiB
        out.seek(20 << 20)
        out.write(b"tail" * (1 << 18))
    return [boot, data]


def _logs(api: httpx.Client, job_id: str) -> str:
    return "\n".join(line["message"] for line in api.get(f"/jobs/logs/{job_id}").json()["logs"])


def test_inventory_through_the_api(api: httpx.Client, moto: Moto, tmp_path: Path) -> None:
    name = unique("t-aws-inv")
    instance = moto.instance(name, volumes_gib=[1, 2], contents=[None, None],
                             instance_type="t3.large", boot_mode="uefi",
                             tags={"team": "web", "env": name})
    running = moto.instance(f"{name}-run", volumes_gib=[1], contents=[None], stopped=False,
                            tags={"env": name})
    caps = api.get("/capabilities").json()["providers"]["aws"]
    assert caps["configured"] and caps["usable"], caps

    def listed(**flt: object) -> list[str]:
        answer = api.post("/vms/list", json={"provider": "aws", "filter": flt})
        assert answer.status_code == 200, answer.text
        return sorted(v["identifier"] for v in answer.json()["vms"])

    both = sorted([instance["InstanceId"], running["InstanceId"]])
    assert listed(tags=[f"env={name}"]) == both
    assert listed(tags=[f"env={name}"], status="poweredOff") == [instance["InstanceId"]]
    assert listed(tags=[f"env={name}"], status="poweredOn") == [running["InstanceId"]]
    assert listed(name_pattern=f"{name}-r*") == [running["InstanceId"]]
    assert listed(tags=[f"env={name}", "team=web"]) == [instance["InstanceId"]]
    assert listed(tags=[f"env={name}"], datacenter="nowhere-1z") == []

    info = api.get("/vms/info", params={"provider": "aws",
                                        "identifier": instance["InstanceId"]}).json()
    assert info["name"] == name and info["power_state"] == "poweredOff"
    assert info["cpus"] == 2 and info["memory_mb"] == 8192  # t3.large
    assert info["firmware"] == "efi" and info["architecture"] == "x86_64"
    assert [d["name"] for d in info["disks"]] == ["/dev/xvda", "/dev/xvdb"]
    assert [d["capacity_bytes"] for d in info["disks"]] == [1 << 30, 2 << 30]
    nic = instance["NetworkInterfaces"][0]
    assert info["nics"][0]["mac"] == nic["MacAddress"].lower()
    assert info["nics"][0]["ip_address"] == nic["PrivateIpAddress"]
    assert info["nics"][0]["network"] == nic["SubnetId"]
    by_name = api.get("/vms/info", params={"provider": "aws", "identifier": name}).json()
    assert by_name["identifier"] == instance["InstanceId"]

    missing = api.get("/vms/info", params={"provider": "aws",
                                           "identifier": "i-0123456789abcdef0"})
    assert missing.status_code == 404 and "i-0123456789abcdef0" in missing.json()["message"]


def test_ebs_migration_ends_with_matching_domain_and_no_snapshots(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    name = unique("t-aws")
    images = _disks(tmp_path, name)
    # the boot volume's first block fails twice before it is read: retried per block
    instance = moto.instance(name, volumes_gib=[1, 1], contents=images, boot_mode="uefi",
                             volume_tags=[{"moto-test:fail-blocks": "0:2"}, {}])
    job_id = submit(api, vm_identifier=instance["InstanceId"], provider="aws",
                    export_method="ova", hyper2kvm_integration={"replace_existing": True})
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    result = info["result"]
    assert result["domain_name"] == name
    disks = [Path(d["path"]) for d in result["disks"]]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the volume"
    facts = domain_facts(name)
    assert facts["vcpus"] == 2 and facts["memory_kib"] == 2048 * 1024  # t3.small
    assert facts["macs"] == [n["MacAddress"].lower() for n in instance["NetworkInterfaces"]]
    assert domain_firmware(name) == "efi"
    assert start_and_stop(name), "the migrated domain does not start"
    # a converting job hands the sparse raw disks to conversion: no OVA is built
    export = result["export"]
    assert export["method"] == "disks"
    assert [Path(f["path"]).suffix for f in export["files"]] == [".raw", ".raw"]
    assert all(len(f["sha256"]) == 64 for f in export["files"])
    logs = _logs(api, job_id)
    assert "snap-" in logs and "(2 block reads retried, 0 bytes from an earlier" in logs, logs
    assert moto.snapshots_of_job(job_id) == [], "the job's snapshots were left behind"


def test_export_task_transport_to_an_ova(api: httpx.Client, daemon: Daemon, moto: Moto,
                                         tmp_path: Path) -> None:
    name = unique("t-aws-et")
    image = _disks(tmp_path, name)[0]
    instance = moto.instance(name, volumes_gib=[1], contents=[image])
    job_id = submit(api, vm_identifier=instance["InstanceId"], provider="aws",
                    export_method="ova", options={"transport": "export-task"},
                    hyper2kvm_integration={"enabled": False})
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "completed", info["error"]
    files = info["result"]["export"]["files"]
    assert [f["role"] for f in files] == ["ova"]
    ova = Path(files[0]["path"])
    raw = tmp_path / "back.raw"
    source_disk_as_raw(ova, raw)
    assert qemu_img.compare(image, raw), "the OVA's disk differs from the volume"
    listing = moto.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"hypersdk/{job_id}/")
    assert listing.get("KeyCount", 0) == 0, "the export object was left in S3"


def test_export_task_limits_and_arm64_are_refused_at_submit(
        api: httpx.Client, moto: Moto) -> None:
    name = unique("t-aws-lim")
    two = moto.instance(name, volumes_gib=[1, 1], contents=[None, None])
    answer = api.post("/jobs/submit", json={
        "vm_identifier": two["InstanceId"], "provider": "aws",
        "options": {"transport": "export-task"}})
    assert answer.status_code == 422 and "one volume" in answer.json()["message"], answer.text
    windows = moto.instance(f"{name}-win", volumes_gib=[1], contents=[None], windows=True)
    answer = api.post("/jobs/submit", json={
        "vm_identifier": windows["InstanceId"], "provider": "aws",
        "options": {"transport": "export-task"}})
    assert answer.status_code == 422 and "Windows" in answer.json()["message"], answer.text
    arm = moto.instance(f"{name}-arm", volumes_gib=[1], contents=[None], arch="arm64",
                        instance_type="m6g.large")
    answer = api.post("/jobs/submit", json={"vm_identifier": arm["InstanceId"],
                                            "provider": "aws"})
    assert answer.status_code == 422 and "arm64" in answer.json()["message"], answer.text
    # without conversion its disks may still be exported
    info = api.get("/vms/info", params={"provider": "aws", "identifier": arm["InstanceId"]})
    assert info.json()["architecture"] == "arm64"


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_block_with_a_wrong_checksum_fails_the_job_and_leaves_nothing(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    name = unique("t-aws-sum")
    image = _disks(tmp_path, name)[0]
    instance = moto.instance(name, volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:corrupt-blocks": "0"}])
    job_id = submit(api, vm_identifier=instance["InstanceId"], provider="aws")
    info = wait_for_job(api, job_id, timeout=300)
    assert info["status"] == "failed"
    assert "block 0" in info["error"] and "does not match" in info["error"], info["error"]
    assert _left_in(EXPORTS / instance["InstanceId"]) == []
    assert _left_in(daemon.images / name) == []
    assert moto.snapshots_of_job(job_id) == []


def test_cancel_mid_download_removes_snapshots_and_partial_files(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    name = unique("t-aws-cancel")
    image = _disks(tmp_path, name)[0]
    instance = moto.instance(name, volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:block-delay": "1.5"}])
    job_id = submit(api, vm_identifier=instance["InstanceId"], provider="aws")
    folder = EXPORTS / instance["InstanceId"]

    def downloading() -> bool:
        return bool(moto.snapshots_of_job(job_id)) and any(
            p.name.endswith(".partial") for p in folder.glob("*"))

    wait_until(downloading, timeout=120, what="the download to start")
    assert api.post("/jobs/cancel", json={"job_id": job_id}).status_code == 200
    info = wait_for_job(api, job_id, timeout=120)
    assert info["status"] == "cancelled"
    wait_until(lambda: moto.snapshots_of_job(job_id) == [], timeout=60,
               what="the job's snapshots to be deleted")
    wait_until(lambda: _left_in(folder) == [], timeout=30, what="partial files removed")


def _provider(moto: Moto, *, settings: Config | None = None,
              **overrides: object) -> AWSProvider:
    section = {"region": REGION, "access_key_id": moto.access_key,
               "secret_access_key": moto.secret_key, "endpoint_url": moto.url, **overrides}
    config = AWSProviderConfig.model_validate(section)
    return AWSProvider(config, settings=settings or Config())


def _role(moto: Moto, prefix: str, actions: str | list[str], *,
          session_seconds: int | None = None) -> str:
    """A role the test user may assume, allowed `actions`; its ARN. `session_seconds`:
    moto hands out its credentials for that long (tests/moto_extensions.py)."""
    name = unique(prefix)
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": "arn:aws:iam::123456789012:user/hypersdk-test"}}]}
    tags = ([{"Key": "moto-test:session-seconds", "Value": str(session_seconds)}]
            if session_seconds is not None else [])
    iam = moto.client("iam")
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                           Tags=tags)["Role"]
    iam.put_role_policy(RoleName=name, PolicyName="policy", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    return str(role["Arn"])


def test_refused_credentials_and_unreachable_endpoint_are_clear(moto: Moto) -> None:
    wrong = _provider(moto, secret_access_key="not-the-secret")
    with pytest.raises(AuthFailed, match="SignatureDoesNotMatch|refused"):
        wrong.check()
    with pytest.raises(AuthFailed):
        wrong.list_vms(VMFilter())
    unknown = _provider(moto, access_key_id="AKIAUNKNOWNKEY000000")
    with pytest.raises(AuthFailed, match="InvalidClientTokenId|AuthFailure"):
        unknown.check()
    nowhere = _provider(moto, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Transient, match="cannot reach AWS"):
        nowhere.list_vms(VMFilter())
    with pytest.raises(NotFound):
        _provider(moto).get_vm("i-00000000000000000")
    # the secret never shows in what the provider reports
    assert moto.secret_key not in repr(_provider(moto).config)


def test_export_task_without_bucket_is_refused(moto: Moto) -> None:
    provider = _provider(moto)
    instance = moto.instance(unique("t-aws-nb"), volumes_gib=[1], contents=[None])
    vm = provider.get_vm(instance["InstanceId"])
    with pytest.raises(Exception, match="export_bucket is not set"):
        provider.check_export(vm, ExportOptions(transport="export-task"), converts=True)


def test_running_instance_stopped_exported_as_ovf_and_started_again(
        moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = unique("t-aws-ovf")
    images = _disks(tmp_path, name)
    instance = moto.instance(name, volumes_gib=[1, 1], contents=images, stopped=False)
    provider = _provider(moto)
    dest = tmp_path / "export"
    moved: list[int] = []
    with caplog.at_level("INFO", logger="providers"):
        result = provider.export(
            instance["InstanceId"], dest, method="ovf", progress=moved.append,
            options=ExportOptions(shutdown_vm=True, restore_power_state=True), job="ovf-job")
    assert f"{instance['InstanceId']}: stopped" in caplog.text
    state = moto.client("ec2").describe_instances(InstanceIds=[instance["InstanceId"]])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
    roles = sorted(f.role for f in result.files)
    assert roles == ["disk", "disk", "manifest", "ovf"]
    assert sum(moved) == 2 << 30  # every byte of both volumes, holes included, once
    disks = [f.path for f in result.files if f.role == "disk"]
    assert [p.suffix for p in disks] == [".vmdk", ".vmdk"]
    for disk, image in zip(disks, images, strict=True):
        assert qemu_img.compare(image, disk), f"{disk.name} differs from the volume"
    manifest = next(f.path for f in result.files if f.role == "manifest").read_text()
    assert all(f"SHA256({p.name})= " in manifest for p in disks)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.path.name for f in result.files)
    assert moto.snapshots_of_job("ovf-job") == []


def test_role_arn_is_assumed_and_its_policy_applies(moto: Moto, tmp_path: Path) -> None:
    role = _role(moto, "hypersdk-role", ["ec2:Describe*"])
    name = role.rsplit("/", 1)[1]
    provider = _provider(moto, role_arn=role)
    identity = provider.clients.sts.get_caller_identity()
    assert f":assumed-role/{name}/hypersdk" in identity["Arn"]
    provider.check()
    provider.list_vms(VMFilter())  # allowed by the role's policy
    instance = moto.instance(unique("t-aws-role"), volumes_gib=[1], contents=[None])
    with pytest.raises(AuthFailed, match="AccessDenied"):  # snapshots: not allowed by it
        provider.export(instance["InstanceId"], tmp_path / "out", method="disks",
                        options=ExportOptions())
    assert not any((tmp_path / "out").iterdir())


def test_an_assumed_roles_credentials_are_refreshed_during_a_long_export(
        moto: Moto, tmp_path: Path) -> None:
    """STS credentials expire (here: after 2 s, the role's tag tells moto so); an export
    that outlasts them assumes the role again and completes."""
    role = _role(moto, "hypersdk-short", "*", session_seconds=2)
    image = tmp_path / "volume.raw"
    image.write_bytes(os.urandom(4 << 20))  # 8 blocks of 512 KiB
    instance = moto.instance(unique("t-aws-expiring"), volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:block-delay": "0.6"}])
    config = AWSProviderConfig.model_validate({
        "region": REGION, "access_key_id": moto.access_key, "secret_access_key": moto.secret_key,
        "endpoint_url": moto.url, "role_arn": role})
    # one block at a time: the reads outlast the credentials several times over
    settings = Config.model_validate({"export": {"part_concurrency": 1}})
    provider = AWSProvider(config, settings=settings)
    result = provider.export(instance["InstanceId"], tmp_path / "out", method="disks",
                             options=ExportOptions(), job="expiring-job")
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.read_bytes()[: 4 << 20] == image.read_bytes()
    assert moto.snapshots_of_job("expiring-job") == []


def test_a_new_snapshot_not_yet_visible_then_pending_is_waited_for(
        moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """EC2 is eventually consistent: the snapshot just made is InvalidSnapshot.NotFound to
    describe_snapshots for a while, then pending with its progress, then completed."""
    image = tmp_path / "volume.raw"
    image.write_bytes(os.urandom(1 << 20))
    instance = moto.instance(unique("t-aws-pending"), volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:snapshot-invisible-seconds": "3",
                                           "moto-test:snapshot-seconds": "8"}])
    caplog.set_level("INFO")
    result = _provider(moto).export(instance["InstanceId"], tmp_path / "out", method="disks",
                                    options=ExportOptions(), job="pending-job")
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.read_bytes()[: 1 << 20] == image.read_bytes()
    assert "not visible yet" in caplog.text, caplog.text
    assert ": pending " in caplog.text and ": completed 100%" in caplog.text, caplog.text
    assert moto.snapshots_of_job("pending-job") == []


def test_throttling_longer_than_the_retries_is_waited_out_not_restarted(
        moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """EBS throttles block reads for 20 s (five retries back off ~12 s): the parts wait
    within the throttle budget and the one snapshot is read to the end."""
    image = tmp_path / "volume.raw"
    image.write_bytes(os.urandom(2 << 20))
    instance = moto.instance(unique("t-aws-throttled"), volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:throttle-seconds": "20"}])
    caplog.set_level("INFO")
    result = _provider(moto).export(instance["InstanceId"], tmp_path / "out", method="disks",
                                    options=ExportOptions(), job="throttled-job")
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.read_bytes()[: 2 << 20] == image.read_bytes()
    assert "RequestThrottledException" in caplog.text
    assert caplog.text.count("snapshots snap-") == 1  # one snapshot made, once
    assert moto.snapshots_of_job("throttled-job") == []


def test_a_retry_after_throttling_outlasted_the_budget_reuses_the_snapshot_and_the_blocks(
        moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """EBS throttles after 8 blocks, longer than a budget of 0 s and one retry: the export
    fails transiently and keeps its snapshot and the blocks it read (a partial file and
    its resume mark). The task's retry, the same job again, makes no new snapshot and
    fetches only the blocks that were missing."""
    image = tmp_path / "volume.raw"
    image.write_bytes(os.urandom(8 << 20))  # 16 blocks of 512 KiB
    instance = moto.instance(unique("t-aws-resume"), volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:throttle-seconds": "4",
                                           "moto-test:throttle-after-blocks": "8"}])
    job = unique("resume-job")
    out = tmp_path / "out"
    impatient = Config.model_validate({"export": {"throttle_budget": 0, "part_retries": 1,
                                                  "part_concurrency": 2}})
    caplog.set_level("INFO")
    with pytest.raises(Transient, match="RequestThrottledException|Rate exceeded"):
        _provider(moto, settings=impatient).export(
            instance["InstanceId"], out, method="disks", options=ExportOptions(), job=job)
    snapshots = moto.snapshots_of_job(job)
    assert len(snapshots) == 1, snapshots  # kept for the retry
    left = sorted(p.name for p in out.iterdir())  # nothing under a finished file's name
    assert [n.rsplit("-", 1)[-1] for n in left] == ["disk1.raw.partial",
                                                    "disk1.raw.resume.partial"], left

    result = _provider(moto).export(instance["InstanceId"], out, method="disks",
                                    options=ExportOptions(), job=job)
    disk = next(f.path for f in result.files if f.role == "disk")
    assert disk.read_bytes()[: 8 << 20] == image.read_bytes()
    assert caplog.text.count("snapshots snap-") == 1  # created once, by the first attempt
    assert "the snapshots an earlier attempt made are used again" in caplog.text
    resumed = [int(word) for line in caplog.text.splitlines()
               if "resuming after the" in line for word in line.split() if word.isdigit()]
    assert resumed and resumed[0] >= 512 << 10, caplog.text  # at least one block from disk
    assert moto.snapshots_of_job(job) == []  # the finished export removed it
    assert sorted(p.name for p in out.iterdir()) == [disk.name]  # no mark, no partial


def _impatient_job(api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path, *,
                   name: str, failures: int) -> tuple[Path, str, str, dict[str, Any]]:
    """(the volume's content, instance id, job id, job info) of a job for an instance whose
    8 MiB volume
    has block 8 failing `failures` times, run by the daemon configured with one retry per
    block and a budget of 0 s (its export task is retried once, as the shared config
    says)."""
    image = tmp_path / "volume.raw"
    image.write_bytes(os.urandom(8 << 20))
    instance = moto.instance(unique(name), volumes_gib=[1], contents=[image],
                             volume_tags=[{"moto-test:fail-blocks": f"8:{failures}"}])
    config = daemon.config.read_text()
    settings = yaml.safe_load(config)
    settings["export"].update(throttle_budget=0, part_retries=1, part_concurrency=1)
    daemon.config.write_text(yaml.safe_dump(settings))  # the next flow run reads it
    try:
        job_id = submit(api, vm_identifier=instance["InstanceId"], provider="aws",
                        hyper2kvm_integration={"replace_existing": True})
        return image, instance["InstanceId"], job_id, wait_for_job(api, job_id, timeout=300)
    finally:
        daemon.config.write_text(config)


def test_a_job_whose_export_failed_transiently_completes_on_the_task_retry_with_one_snapshot(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    """Block 8 fails twice, past the one retry per block: the export task fails
    transiently, and Prefect's retry of the task uses the snapshot and the blocks the
    first attempt read; the job completes."""
    image, _, job_id, info = _impatient_job(api, daemon, moto, tmp_path,
                                            name="t-aws-taskretry", failures=2)
    assert info["status"] == "completed", info["error"]
    disk = Path(info["result"]["disks"][0]["path"])
    assert qemu_img.compare(image, disk)
    logs = _logs(api, job_id)
    assert "snapshots kept for the export's retry" in logs, logs
    assert "the snapshots an earlier attempt made are used again" in logs, logs
    assert f"resuming after the {8 * (512 << 10)} bytes" in logs, logs
    assert logs.count(" created") == 1, logs  # one snapshot, made by the first attempt
    assert moto.snapshots_of_job(job_id) == []


def test_a_job_whose_retries_all_failed_leaves_no_snapshot_and_no_partial_file(
        api: httpx.Client, daemon: Daemon, moto: Moto, tmp_path: Path) -> None:
    """Block 8 fails on every try: each attempt keeps what it made for the next, and once
    the last one failed the job's failure hook removes the snapshot and the partial
    files (nothing is billed or left on the disk for a retry that will not come)."""
    _, instance_id, job_id, info = _impatient_job(api, daemon, moto, tmp_path,
                                                  name="t-aws-allfail", failures=100)
    assert info["status"] == "failed", info
    logs = _logs(api, job_id)
    assert "snapshots kept for the export's retry" in logs, logs
    assert moto.snapshots_of_job(job_id) == []
    assert _left_in(EXPORTS / instance_id) == []


def test_a_role_that_may_not_snapshot_is_a_blocker_found_with_dry_run_calls(
        moto: Moto) -> None:
    """EC2's DryRun asks "would this be allowed" without making anything: a role allowed
    to describe but not to snapshot is a permission_denied blocker, and no snapshot
    exists afterwards."""
    role = _role(moto, "hypersdk-readonly", ["ec2:Describe*"])
    instance = moto.instance(unique("t-aws-dry"), volumes_gib=[1], contents=[None])
    limited = _provider(moto, role_arn=role)
    vm = limited.get_vm(instance["InstanceId"])
    blockers = limited.blockers(vm, ExportOptions(), converts=False)
    assert [b.code for b in blockers] == ["permission_denied"], blockers
    assert "ec2:CreateSnapshots" in blockers[0].message
    # the same question with every permission: allowed, and still nothing made
    assert _provider(moto).blockers(vm, ExportOptions(), converts=False) == []
    snapshots = moto.client("ec2").describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert not [s for s in snapshots if s.get("VolumeId") == vm.disks[0].datastore]


def test_a_vm_export_bucket_with_acls_disabled_is_a_blocker(moto: Moto) -> None:
    """New buckets have ACLs disabled; VM Export writes with an ACL grant, so its task
    would fail after it started: the dry run (and validate) say so first."""
    s3 = moto.client("s3")
    enforced = unique("acl-off")
    s3.create_bucket(Bucket=enforced)  # as made today, defaults kept
    instance = moto.instance(unique("t-aws-acl"), volumes_gib=[1], contents=[None])
    options = ExportOptions(transport="export-task")
    provider = _provider(moto, export_bucket=enforced)
    vm = provider.get_vm(instance["InstanceId"])
    blockers = provider.blockers(vm, options, converts=False)
    assert [b.code for b in blockers] == ["bucket_acls_disabled"], blockers
    assert enforced in blockers[0].message
    assert _provider(moto, export_bucket=BUCKET).blockers(vm, options, converts=False) == []


def test_a_volume_whose_kms_key_is_disabled_is_a_blocker(moto: Moto) -> None:
    """EBS direct reads of an encrypted volume's snapshot need its KMS key: one that is
    disabled (or pending deletion) is a blocker naming the volume, the key and its
    state; enabled again, none."""
    kms = moto.client("kms")
    key = kms.create_key(Description=unique("hypersdk-test"))["KeyMetadata"]["KeyId"]
    instance = moto.instance(unique("t-aws-kms"), volumes_gib=[1, 1], contents=[None, None],
                             kms_keys=[None, key])
    provider = _provider(moto)
    vm = provider.get_vm(instance["InstanceId"])
    assert provider.blockers(vm, ExportOptions(), converts=False) == []
    kms.disable_key(KeyId=key)
    blockers = provider.blockers(vm, ExportOptions(), converts=False)
    assert [b.code for b in blockers] == ["kms_key_unusable"], blockers
    assert key in blockers[0].message and "Disabled" in blockers[0].message
    assert vm.disks[1].datastore in blockers[0].message
    kms.enable_key(KeyId=key)
    assert provider.blockers(vm, ExportOptions(), converts=False) == []


def test_a_vm_export_bucket_that_does_not_grant_the_export_account_is_a_blocker(
        moto: Moto, tmp_path: Path) -> None:
    """ACLs on but no grant to the region's VM Import/Export account: the task would run
    and then fail (moto's VM Export, as AWS's, fails it); the dry run says so first, with
    the command that grants it, and once granted the export works."""
    s3 = moto.client("s3")
    bucket = unique("no-grant")
    s3.create_bucket(Bucket=bucket, ObjectOwnership="BucketOwnerPreferred")
    image = tmp_path / "volume.raw"
    image.write_bytes(os.urandom(1 << 20))
    instance = moto.instance(unique("t-aws-grant"), volumes_gib=[1], contents=[image])
    options = ExportOptions(transport="export-task")
    provider = _provider(moto, export_bucket=bucket)
    vm = provider.get_vm(instance["InstanceId"])
    blockers = provider.blockers(vm, options, converts=False)
    assert [b.code for b in blockers] == ["bucket_grant_missing"], blockers
    assert "WRITE and READ_ACP" in blockers[0].message
    assert f"--grant-write id={VM_EXPORT_GRANTEE}" in blockers[0].message
    with pytest.raises(ProviderError, match="Insufficient permissions"):
        provider.export(instance["InstanceId"], tmp_path / "out", method="disks",
                        options=options, job=unique("grant-job"))
    grant_vm_export(s3, bucket)
    assert provider.blockers(vm, options, converts=False) == []
    result = provider.export(instance["InstanceId"], tmp_path / "out", method="disks",
                             options=options, job=unique("grant-job"))
    disk = next(f.path for f in result.files if f.role == "disk")
    assert qemu_img.compare(image, disk)
