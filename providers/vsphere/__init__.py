"""The vSphere provider (vCenter or ESXi) on pyVmomi: inventory through the
PropertyCollector, export over NFC or the datastore HTTP interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyVmomi import vim

from core.config import VSphereProviderConfig
from core.errors import InvalidRequest
from core.models import (
    Blocker,
    ExportOptions,
    ExportResult,
    PowerState,
    VMFilter,
    VMInfo,
    VMSummary,
)
from hyper2kvm.output import OutputImage
from providers.base import BytesProgress, ExportMethod, OpenOutput, Provider, WarmRound
from providers.vsphere import inventory, warm
from providers.vsphere.export import check_exportable, export_vm, restore_power
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
        """A powered-on VM without shutdown_vm: its disks are in use (a warm migration
        reads a running VM through its snapshots)."""
        if options.warm:
            return []
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

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        if options.warm:
            with pool_for(self.config).session() as session:
                found = session.call(lambda: inventory.find_vm(session, vm.identifier),
                                     f"vSphere {self.config.host}")
                warm.check_tracking(session, found, options)

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
        """A snapshot per round, its changed areas by CBT (providers/vsphere/warm.py); the
        VM is powered off for the final round."""
        if job is None:
            raise InvalidRequest("a warm round belongs to a job")
        work = self.settings.export
        with pool_for(self.config).session() as session:
            vm, info = self._located(session, identifier)
            return warm.warm_round(session, vm, info, outputs, options=options, final=final,
                                   job=job, retries=work.part_retries,
                                   concurrency=work.part_concurrency, progress=progress)

    def power_on(self, identifier: str) -> None:
        with pool_for(self.config).session() as session:
            vm, _ = self._located(session, identifier)
            restore_power(session, vm, PowerState.POWERED_ON)

    def discard(self, job: str) -> list[str]:
        """The snapshots a cancelled or failed warm job's rounds left (one retrieval of
        every VM's snapshot tree)."""
        removed: list[str] = []
        with pool_for(self.config).session() as session:
            rows = inventory.retrieve(session.content, {vim.VirtualMachine: ["snapshot"]})
            for vm, props in rows:
                left = warm.job_snapshots(props.get("snapshot"), job)
                warm.remove_snapshots(session, left)
                removed += [f"snapshot {s._moId} of {vm._moId}" for s in left]
        return removed

    def _located(self, session: Session, identifier: str) -> tuple[Any, VMInfo]:
        """The VM's managed object and its hardware, as an export starts from them."""
        vm = session.call(lambda: inventory.find_vm(session, identifier),
                          f"vSphere {self.config.host}")
        return vm, session.call(lambda: inventory.vm_info(session, vm),
                                f"vSphere {self.config.host}")
