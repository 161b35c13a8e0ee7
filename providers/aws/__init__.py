"""The AWS provider on boto3: EC2 instances listed and described, their disks read from
snapshots through the EBS direct APIs, or through VM Export into S3."""

from __future__ import annotations

from pathlib import Path

from core.config import AWSProviderConfig
from core.errors import InvalidRequest
from core.models import Blocker, ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from hyper2kvm.output import OutputImage
from providers.aws import encryption, export, inventory, warm
from providers.aws.session import Clients, call, clients_for
from providers.base import BytesProgress, ExportMethod, Provider, WarmRound
from providers.ranged import Reading


class AWSProvider(Provider):
    name = "aws"
    config: AWSProviderConfig

    @property
    def clients(self) -> Clients:
        work = self.settings.export
        return clients_for(self.config,
                           pool_size=work.disk_concurrency * work.part_concurrency + 4)

    def check(self) -> None:
        """The credentials are valid: STS says whose they are."""
        call(self.clients.sts.get_caller_identity, f"AWS {self.config.region}")

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        return inventory.list_vms(self.clients, vm_filter)

    def get_vm(self, identifier: str) -> VMInfo:
        clients = self.clients
        return inventory.vm_info(clients, inventory.find_instance(clients, identifier))

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        encrypted: list[str] = []
        marketplace = False
        if export.transport_of(options) == "export-task":
            clients = self.clients
            volume_ids = [d.datastore for d in vm.disks if d.datastore]
            if volume_ids:
                volumes = call(clients.ec2.describe_volumes, f"AWS volumes of {vm.identifier}",
                               VolumeIds=volume_ids)["Volumes"]
                encrypted = [v["VolumeId"] for v in volumes if v.get("Encrypted")]
            instance = inventory.find_instance(clients, vm.identifier)
            marketplace = any(c.get("ProductCodeType") == "marketplace"
                              for c in instance.get("ProductCodes") or [])
        export.check_exportable(vm, options, converts=converts,
                                export_bucket=self.config.export_bucket, encrypted=encrypted,
                                marketplace=marketplace)

    def blockers(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> list[Blocker]:
        found = export.permission_blockers(self.clients, vm, options)
        if export.transport_of(options) == "export-task":
            found += export.bucket_blockers(self.clients, self.config.export_bucket)
        else:
            found += encryption.key_blockers(self.clients, vm)
        return found

    def export(
        self,
        identifier: str,
        dest: Path,
        *,
        method: ExportMethod,
        options: ExportOptions,
        progress: BytesProgress | None = None,
        job: str | None = None,
    ) -> ExportResult:
        vm = self.get_vm(identifier)
        self.check_export(vm, options, converts=False)
        reading = Reading.from_settings(dest, self.settings.export, progress)
        exported, files = export.export_instance(
            self.clients, vm, reading, method=method, options=options,
            bucket=self.config.export_bucket, job=job)
        return ExportResult(vm=exported, directory=dest, files=files, method=method)

    def warm_round(
        self,
        identifier: str,
        outputs: list[OutputImage],
        *,
        options: ExportOptions,
        final: bool,
        progress: BytesProgress | None = None,
        job: str | None = None,
    ) -> WarmRound:
        """A snapshot of every volume per round; after the precopy only the blocks EBS
        says changed since the last round that was copied (providers/aws/warm.py)."""
        if job is None:
            raise InvalidRequest("a warm round belongs to a job")
        work = self.settings.export
        return warm.warm_round(self.clients, self.get_vm(identifier), outputs,
                               options=options, final=final, job=job,
                               concurrency=work.part_concurrency, retries=work.part_retries,
                               progress=progress)

    def power_on(self, identifier: str) -> None:
        export.start_instance(self.clients, identifier)

    def discard(self, job: str) -> list[str]:
        return export.discard(self.clients, job, self.config.export_bucket)
