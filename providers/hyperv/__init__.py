"""The Hyper-V provider: PowerShell over WinRM (pywinrm) for the control plane, VHDX files
over SMB 3 (smbprotocol) for the bytes."""

from __future__ import annotations

from pathlib import Path

from core.config import HyperVProviderConfig
from core.errors import InvalidRequest
from core.models import Blocker, ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from providers.base import BytesProgress, ExportMethod, Provider
from providers.clients import ClientCache
from providers.hyperv import export, inventory
from providers.hyperv.powershell import Host, host_for
from providers.hyperv.share import Connections, Share
from providers.ranged import Reading

# the SMB connections of each configured share: ours, not smbclient's process-wide pool
_SMB: ClientCache[HyperVProviderConfig, Connections] = ClientCache(lambda _c: Connections())


class HyperVProvider(Provider):
    name = "hyperv"
    config: HyperVProviderConfig

    @property
    def host(self) -> Host:
        return host_for(self.config)

    @property
    def share(self) -> Share:
        return Share.from_config(self.config, _SMB.get(self.config))

    def check(self) -> None:
        """The host runs a command for these credentials, and the share opens."""
        self.host.run("$PSVersionTable.PSVersion.Major", "WinRM")
        if self.config.export_share:
            self.share.check()

    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        return inventory.list_vms(self.host, vm_filter)

    def _find(self, identifier: str) -> tuple[VMInfo, list[inventory.VirtualDisk]]:
        host = self.host
        found = inventory.find_vm(host, identifier)
        disks = inventory.virtual_disks(host, str(found["Id"]), str(found["Name"]))
        return inventory.vm_info(host, found, disks), disks

    def get_vm(self, identifier: str) -> VMInfo:
        return self._find(identifier)[0]

    def check_export(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> None:
        export.check_exportable(options, self.config.export_share)

    def blockers(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> list[Blocker]:
        found = inventory.unexportable(vm)  # from get_vm's answer: no second round trip
        if found or not self.config.export_share or not self.share.remote:
            return found
        # a share the host writes as its computer account: the disks' files and chains
        # say whether the export stages there
        host = self.host
        disks = inventory.virtual_disks(host, vm.identifier, vm.name)
        return export.host_write_blockers(host, self.share, vm, disks, options)

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
        export.check_exportable(options, self.config.export_share)
        vm, disks = self._find(identifier)
        if (blockers := inventory.unexportable(vm)):
            raise InvalidRequest("; ".join(blocker.message for blocker in blockers))
        reading = Reading.from_settings(dest, self.settings.export, progress)
        exported, files = export.export_vm(self.host, self.share, vm, disks, reading,
                                           method=method, options=options, job=job)
        return ExportResult(vm=exported, directory=dest, files=files, method=method)

    def discard(self, job: str) -> list[str]:
        if not self.config.export_share:
            return []
        return export.discard(self.host, self.share, job)
