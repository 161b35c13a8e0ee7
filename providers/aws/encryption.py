"""The KMS keys of encrypted volumes. Reading a snapshot of one through the EBS direct
APIs needs `kms:Decrypt` on its key (which AWS cannot be asked about without a ciphertext),
and a key that is disabled or pending deletion makes every such read fail: that much is
asked (`kms:DescribeKey`) before anything is made."""

from __future__ import annotations

import logging

from core.errors import AuthFailed
from core.models import Blocker, VMInfo
from providers.aws.session import Clients, call

log = logging.getLogger(__name__)


def key_blockers(clients: Clients, vm: VMInfo) -> list[Blocker]:
    """Each encrypted volume whose key cannot decrypt now, naming the key and its state."""
    volume_ids = [d.datastore for d in vm.disks if d.datastore]
    if not volume_ids:
        return []
    volumes = call(clients.ec2.describe_volumes, f"AWS volumes of {vm.identifier}",
                   VolumeIds=volume_ids)["Volumes"]
    blockers = []
    for volume in volumes:
        key_id = volume.get("KmsKeyId")
        if not volume.get("Encrypted") or not key_id:
            continue
        try:
            key = call(clients.kms.describe_key, f"KMS key {key_id}", KeyId=key_id)
        except AuthFailed as exc:  # may not look: the read itself will say
            log.warning("volume %s: its KMS key not checked: %s", volume["VolumeId"], exc)
            continue
        state = key["KeyMetadata"].get("KeyState", "")
        if state != "Enabled":
            blockers.append(Blocker(code="kms_key_unusable", message=(
                f"volume {volume['VolumeId']} is encrypted with KMS key {key_id}, which is "
                f"{state}: its snapshot cannot be read until the key is enabled (reading it "
                "also needs kms:Decrypt on the key)")))
    return blockers
