"""The Azure provider on azure-mgmt-compute and azure-mgmt-network: VMs listed and
described, their managed disks read from snapshots as page ranges (azure-storage-blob)."""

from __future__ import annotations

from pathlib import Path

from core.config import AzureProviderConfig
from core.models import Blocker, ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from providers.azure import export, inventory, permissions
from providers.azure.session import Clients, call, clients_for
from providers.base import BytesProgress, ExportMethod, Provider
from providers.ranged import Reading


class AzureProvider(Provider):
    name = "azure"
    config: AzureProviderConfig

    @property
    def clients(self) -> Clients:
        return clients_for(self.config)

    def check(self) -> None:
        """The credentials get a token and the subscription answers: one page of its VMs."""
        compute = self.clients.compute
        call(lambda: next(iter(compute.virtual_machines.list_all().by_page()), None),
             f"Azure subscription {self.config.subscription_id}")

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        return inventory.list_vms(self.clients, vm_filter)

    def get_vm(self, identifier: str) -> VMInfo:
        clients = self.clients
        return inventory.vm_info(clients, inventory.find_vm(clients, identifier))

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        export.check_exportable(options)

    def blockers(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> list[Blocker]:
        return [*export.access_blockers(self.clients, vm),
                *permissions.permission_blockers(self.clients, vm, options)]

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
        export.check_exportable(options)
        reading = Reading.from_settings(dest, self.settings.export, progress)
        exported, files = export.export_vm(self.clients, vm, reading, method=method,
                                           options=options, job=job)
        return ExportResult(vm=exported, directory=dest, files=files, method=method)

    def discard(self, job: str) -> list[str]:
        return export.discard(self.clients, job)
