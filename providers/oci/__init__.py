"""The OCI provider on the oci SDK: instances listed and described, their boot volume
exported as a custom image into Object Storage (QCOW2) and downloaded with parallel
ranged reads."""

from __future__ import annotations

from pathlib import Path

from core.config import OCIProviderConfig
from core.models import ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from providers.base import BytesProgress, ExportMethod, Provider
from providers.oci import export, inventory
from providers.oci.session import Clients, call, clients_for
from providers.ranged import Reading


class OCIProvider(Provider):
    name = "oci"
    config: OCIProviderConfig

    @property
    def clients(self) -> Clients:
        return clients_for(self.config)

    def check(self) -> None:
        """The key signs a request the tenancy accepts: one page of instances."""
        clients = self.clients
        call(lambda: clients.compute.list_instances(clients.compartment, limit=1),
             f"OCI compartment {clients.compartment}")

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        return inventory.list_vms(self.clients, vm_filter)

    def get_vm(self, identifier: str) -> VMInfo:
        clients = self.clients
        return inventory.vm_info(clients, inventory.find_instance(clients, identifier))

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        export.check_exportable(vm, options, self.config.export_bucket)

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
