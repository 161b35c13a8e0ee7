"""The AWS test peer: moto's server, extended by tests/moto_extensions.py, in its own
process on a free port for the session; helpers that make instances with real volume
content through boto3 (nothing here reaches into moto's memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.peers import free_port

REGION = "us-east-1"
VM_EXPORT_GRANTEE = "c4d8eabf8db69dbe46bfe0e517100c554f01200b104d59cd408e777ba442a322"
BUCKET = "hypersdk-exports"
SECRET_ENV = "AWS_TEST_SECRET_ACCESS_KEY"


@dataclass
class Moto:
    url: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    images: dict[tuple[str, str], str] = field(default_factory=dict)

    def client(self, service: str, *, secret: str | None = None) -> Any:
        return boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret or self.secret_key, region_name=REGION,
        ).client(service, endpoint_url=self.url)

    def image(self, *, arch: str = "x86_64", boot_mode: str = "legacy-bios",
              windows: bool = False) -> str:
        """A registered image (one per kind, made once)."""
        kind = (arch, f"{boot_mode}{'-windows' if windows else ''}")
        if kind not in self.images:
            self.images[kind] = self.client("ec2").register_image(
                Name=f"img-{arch}-{kind[1]}", Architecture=arch, BootMode=boot_mode,
                RootDeviceName="/dev/xvda",
                Description="Windows Server" if windows else "Debian")["ImageId"]
        return self.images[kind]

    def instance(self, name: str, *, volumes_gib: list[int], contents: list[Path | None],
                 instance_type: str = "t3.small", arch: str = "x86_64",
                 boot_mode: str = "legacy-bios", windows: bool = False,
                 tags: dict[str, str] | None = None, stopped: bool = True,
                 volume_tags: list[dict[str, str]] | None = None,
                 kms_keys: list[str | None] | None = None) -> dict[str, Any]:
        """An instance whose volumes (xvda, xvdb, ...) hold `contents` (raw files read by
        the extended moto when a snapshot is taken), tagged Name=`name`; a volume with a
        key in `kms_keys` is encrypted with it."""
        ec2 = self.client("ec2")
        keys = kms_keys or [None] * len(volumes_gib)
        mappings = [{"DeviceName": f"/dev/xvd{chr(ord('a') + i)}",
                     "Ebs": {"VolumeSize": size, **(
                         {"Encrypted": True, "KmsKeyId": keys[i]} if keys[i] else {})}}
                    for i, size in enumerate(volumes_gib)]
        instance = ec2.run_instances(
            ImageId=self.image(arch=arch, boot_mode=boot_mode, windows=windows),
            MinCount=1, MaxCount=1, InstanceType=instance_type, BlockDeviceMappings=mappings,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "Name", "Value": name},
                *({"Key": k, "Value": v} for k, v in (tags or {}).items())]}],
        )["Instances"][0]
        by_device = {m["DeviceName"]: m["Ebs"]["VolumeId"]
                     for m in instance["BlockDeviceMappings"]}
        for index, mapping in enumerate(mappings):
            volume_tags_here = dict((volume_tags or [{}] * len(mappings))[index])
            if contents[index] is not None:
                volume_tags_here["moto-test:content"] = str(contents[index])
            if volume_tags_here:
                ec2.create_tags(Resources=[by_device[mapping["DeviceName"]]],
                                Tags=[{"Key": k, "Value": v} for k, v in volume_tags_here.items()])
        if stopped:
            ec2.stop_instances(InstanceIds=[instance["InstanceId"]])
        return ec2.describe_instances(InstanceIds=[instance["InstanceId"]])[
            "Reservations"][0]["Instances"][0]

    def instance_state(self, instance_id: str) -> str:
        answer = self.client("ec2").describe_instances(InstanceIds=[instance_id])
        return str(answer["Reservations"][0]["Instances"][0]["State"]["Name"])

    def snapshots_of_job(self, job_id: str) -> list[str]:
        answer = self.client("ec2").describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": "tag:hypersdk:job", "Values": [job_id]}])
        return [s["SnapshotId"] for s in answer["Snapshots"]]

    def config_section(self) -> str:
        """providers.aws for a daemon's config, the secret from the environment."""
        return (f'  aws:\n    region: "{REGION}"\n    access_key_id: "{self.access_key}"\n'
                f'    secret_access_key: "${{{SECRET_ENV}}}"\n'
                f'    endpoint_url: "{self.url}"\n    export_bucket: "{BUCKET}"\n')


def start_moto() -> Moto:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.moto_extensions", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=Path(__file__).parent.parent)
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if not line or line[0] != "ready":
        process.kill()
        raise RuntimeError(f"moto did not start: {line}")
    moto = Moto(url=f"http://127.0.0.1:{port}", access_key=line[1], secret_key=line[2],
                process=process)
    os.environ[SECRET_ENV] = moto.secret_key
    # set up for VM Export as its guide says: ACLs on, and the region's VM Import/Export
    # account granted WRITE and READ_ACP beside the owner's FULL_CONTROL
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET, ObjectOwnership="BucketOwnerPreferred")
    grant_vm_export(s3, BUCKET)
    return moto


def grant_vm_export(s3: Any, bucket: str) -> None:
    owner = s3.get_bucket_acl(Bucket=bucket)["Owner"]["ID"]
    s3.put_bucket_acl(Bucket=bucket, GrantFullControl=f"id={owner}",
                      GrantWrite=f"id={VM_EXPORT_GRANTEE}",
                      GrantReadACP=f"id={VM_EXPORT_GRANTEE}")


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    server = start_moto()
    yield server
    server.process.kill()
    server.process.wait()
