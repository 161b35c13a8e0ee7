"""The vSphere provider (vCenter or ESXi) on pyVmomi: inventory through the
PropertyCollector, export over NFC or the datastore HTTP interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import VSphereProviderConfig
from core.errors import InvalidRequest
from core.models import Blocker, ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from providers.base import BytesProgress, ExportMethod, OpenOutput, Provider
from providers.vsphere import inventory
from providers.vsphere.export import check_exportable, export_vm
from providers.vsphere.session import Session, pool_for
from providers.vsphere.stream import stream_vm


class VSphereProvider(Provider):
    name = "vsphere"
    config: VSphereProviderConfig

    def check(self) -> None:
        """A logged-in session (from the pool, or a fresh login) answers CurrentTime."""
        with pool_for(self.config).session() as session:
            session.call(lambda: session.instance.CurrentTime(), f"vSphere {self.config.host}")

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        with pool_for(self.config).session() as session:
            vms = session.call(lambda: inventory.list_vms(session), f"vSphere {self.config.host}")
        return [vm for vm in vms if vm_filter.matches(vm)]

    def blockers(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> list[Blocker]:
        """A powered-on VM without shutdown_vm: its disks are in use."""
        try:
            check_exportable(vm, options)
        except InvalidRequest as exc:
            return [Blocker(code="vm_powered_on", message=str(exc))]
        return []

    def get_vm(self, identifier: str) -> VMInfo:
        with pool_for(self.config).session() as session:
            return session.call(
                lambda: inventory.vm_info(session, inventory.find_vm(session, identifier)),
                f"vSphere {self.config.host}")

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
        export = self.settings.export
        with pool_for(self.config).session() as session:
            vm, info = self._located(session, identifier)
            exported, files = export_vm(
                session, vm, info, dest, method=method, options=options,
                chunk_size=export.chunk_size, retries=export.max_retries,
                disk_concurrency=export.disk_concurrency, progress=progress)
        return ExportResult(vm=exported, directory=dest, files=files, method=method)

    def stream(
        self,
        identifier: str,
        open_output: OpenOutput,
        *,
        options: ExportOptions,
        progress: BytesProgress | None = None,
        job: str | None = None,
    ) -> VMInfo | None:
        export = self.settings.export
        with pool_for(self.config).session() as session:
            vm, info = self._located(session, identifier)
            return stream_vm(session, vm, info, open_output, options=options,
                             retries=export.max_retries,
                             disk_concurrency=export.disk_concurrency, progress=progress)

    def _located(self, session: Session, identifier: str) -> tuple[Any, VMInfo]:
        """The VM's managed object and its hardware, as an export starts from them."""
        vm = session.call(lambda: inventory.find_vm(session, identifier),
                          f"vSphere {self.config.host}")
        return vm, session.call(lambda: inventory.vm_info(session, vm),
                                f"vSphere {self.config.host}")
