"""The GCP provider on google-cloud-compute, google-cloud-build and google-cloud-storage:
instances listed and described, their disks exported as images into Cloud Storage and
downloaded with parallel ranged reads."""

from __future__ import annotations

from pathlib import Path

from google.cloud import compute_v1

from core.config import GCPProviderConfig
from core.models import Blocker, ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from providers.base import BytesProgress, ExportMethod, Provider
from providers.gcp import export, inventory, tool
from providers.gcp.session import Clients, call, clients_for
from providers.ranged import Reading


class GCPProvider(Provider):
    name = "gcp"
    config: GCPProviderConfig

    @property
    def clients(self) -> Clients:
        return clients_for(self.config)

    def check(self) -> None:
        """The credentials get a token and the project answers: one page of instances."""
        clients = self.clients
        call(lambda: next(iter(clients.instances.aggregated_list(
            request=compute_v1.AggregatedListInstancesRequest(
                project=clients.project, max_results=1)).pages), None),
            f"GCP project {self.config.project}")

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        return inventory.list_vms(self.clients, vm_filter)

    def get_vm(self, identifier: str) -> VMInfo:
        clients = self.clients
        return inventory.vm_info(clients, inventory.find_instance(clients, identifier))

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        export.check_exportable(self.config.export_bucket, options)

    def blockers(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> list[Blocker]:
        return [*export.local_disk_blockers(vm, options),
                *export.permission_blockers(self.clients, vm),
                *export.csek_blockers(self.clients, vm),
                *export.network_blockers(self.clients),
                *tool.role_blockers(self.clients)]

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
        reading = Reading.from_settings(dest, self.settings.export, progress)
        exported, files = export.export_vm(self.clients, vm, reading, method=method,
                                           options=options, job=job)
        return ExportResult(vm=exported, directory=dest, files=files, method=method)

    def discard(self, job: str) -> list[str]:
        return export.discard(self.clients, job)
