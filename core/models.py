"""The shapes that cross rooms: VMs as providers describe them, jobs as users submit them."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from core.paths import within_os_limits

PROVIDER_NAMES = ("local", "vsphere", "aws", "azure", "gcp", "hyperv", "oci")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# a path a user gives: refused with 422 when no OS could open it
OSPath = Annotated[str, Field(max_length=4095), AfterValidator(within_os_limits)]
AbsolutePath = Annotated[OSPath, Field(pattern=r"^/")]  # a file on this host


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PowerState(StrEnum):
    POWERED_ON = "poweredOn"
    POWERED_OFF = "poweredOff"
    SUSPENDED = "suspended"


class DiskInfo(Strict):
    """One virtual disk of a VM."""

    name: str
    capacity_bytes: int = Field(ge=0)
    # what a thin disk holds (OVF populatedSize, a local file's blocks); None: not known
    allocated_bytes: int | None = Field(default=None, ge=0)
    format: str = "vmdk"
    controller: str = "scsi"
    unit: int | None = None  # position on its controller (OVF AddressOnParent)
    file: str | None = None  # the disk's file in the export (OVF file reference)
    datastore: str | None = None
    # instance-local storage (a GCP local SSD): scratch data, lost at every stop, that no
    # platform can image; listed, never exported
    local: bool = False


class NicInfo(Strict):
    """One network adapter of a VM."""

    mac: str | None = None
    network: str | None = None
    adapter: str = "virtio"
    ip_address: str | None = None
    # the platform tells no MAC (GCP): this one is derived, stable for this VM and NIC
    mac_derived: bool = False

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        mac = value.strip().lower().replace("-", ":")
        if not _MAC.match(mac):
            raise ValueError(f"not a MAC address: {value!r}")
        return mac


class VMSummary(Strict):
    """A VM as a listing shows it."""

    identifier: str
    name: str
    provider: str
    power_state: PowerState = PowerState.POWERED_OFF
    datacenter: str | None = None
    folder: str | None = None
    tags: list[str] = Field(default_factory=list)


class VMInfo(VMSummary):
    """A VM's hardware, enough to rebuild it on KVM."""

    cpus: int = Field(default=1, ge=1)
    memory_mb: int = Field(default=1024, ge=1)
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    guest_os: str | None = None
    architecture: str | None = None  # x86_64, arm64, ... where the platform says
    disks: list[DiskInfo] = Field(default_factory=list)
    nics: list[NicInfo] = Field(default_factory=list)
    cdroms: int = 0
    snapshots: list[str] = Field(default_factory=list)  # names, parents before children


class ExportedFile(Strict):
    """A file an export wrote, with its checksum."""

    path: Path
    size: int
    sha256: str | None = None
    role: Literal["ova", "ovf", "manifest", "disk", "other"]


class ExportResult(Strict):
    """What a provider's export left under the export path."""

    vm: VMInfo
    directory: Path
    files: list[ExportedFile]
    # "disks": for a job that converts, the disks in the form cheapest to convert, unpackaged
    method: Literal["ova", "ovf", "vmdk", "disks"]
    linked: bool = False  # hard links, no bytes copied
    # the one-pass path: the disks went straight into the converted images, no file here
    streamed: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def missing(self) -> str | None:
        """What of the export is no longer there as it was written, or None."""
        for file in self.files:
            try:
                size = file.path.stat().st_size
            except OSError:
                return f"{file.path} is gone"
            if size != file.size:
                return f"{file.path} is {size} bytes, not the {file.size} exported"
        return None


class ExportOptions(Strict):
    shutdown_vm: bool = False  # a running VM: guest shutdown, then power off at the timeout
    shutdown_timeout: int = Field(default=300, ge=0, le=86400)  # seconds
    restore_power_state: bool = False  # power the VM on again after the export
    remove_cdrom: bool = True  # from the exported descriptor; the source is never changed
    compress: bool = False
    # how disks leave the platform. vSphere: nfc (ExportVm lease), datastore (HTTP /folder),
    # auto (nfc, falling back to datastore when the server has no ExportVm). AWS: ebs
    # (snapshots read through the EBS direct APIs; auto), export-task (an export to S3).
    # Hyper-V: auto (a powered-off VM read in place from the share), export (Export-VM
    # into the share first)
    transport: Literal["auto", "nfc", "datastore", "ebs", "export-task", "export"] = "auto"
    keep_snapshots: bool = False  # leave the snapshots/images made in the source account
    # OCI: a custom image holds the boot volume only; say so to export an instance that
    # has block volumes attached without them
    boot_volume_only: bool = False
    # migrate an instance with local disks (GCP local SSDs) without them
    skip_local_disks: bool = False
    # a job that converts keeps its export too (written as export_method asks, then
    # converted); otherwise the disks are streamed straight into the converted images
    # where the provider can (vSphere), and no copy is left in the export folder
    keep_export: bool = False
    # warm migration: copy while the VM runs (precopy), then only what changed, every
    # precopy_interval seconds, until cutover (POST /jobs/cutover, the Prefect UI's
    # resume form, or cutover_at): a last round with the VM off, then convert and define
    warm: bool = False
    precopy_interval: int = Field(default=600, ge=5, le=86400)
    cutover_at: datetime | None = None
    enable_cbt: bool = False  # vSphere: a warm job may turn Changed Block Tracking on


GuestMode = bool | Literal["auto"]


class GuestOptions(Strict):
    """What makes a converted VM boot on KVM: guest conversion, the domain's buses, and
    the boot check. None: the config's hyper2kvm defaults."""

    compat_mode: bool | None = None  # SATA + e1000; None: as the guest's drivers allow
    # virt-v2v-in-place: true converts or fails the job; "auto" converts where it finds an
    # OS it can convert and keeps the disks as copied where not; None: the config's
    convert_guest: GuestMode | None = None
    verify_boot: Literal["off", "warn", "require"] | None = None
    boot_timeout: float | None = Field(default=None, gt=0, le=86400)
    boot_pattern: str | None = Field(
        default=None, max_length=500,
        description="a regular expression the console shows once the guest is up "
                    "(default: a login prompt)")

    @field_validator("boot_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"boot_pattern is not a regular expression: {exc}") from None
        return value


class Hyper2kvmIntegration(GuestOptions):
    enabled: bool = True
    auto_convert: bool = True
    format: Literal["qcow2", "raw"] | None = None  # None: hyper2kvm.default_format
    daemon_mode: bool = False
    instance: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    autostart: bool = False
    replace_existing: bool = False
    # more vCPUs or memory than this host has fails validate (else: a warning in the result)
    strict: bool = False


class Blocker(Strict):
    """What stops a job, found before anything is touched: a stable `code` to act on and a
    message that names the thing and the fix."""

    code: str
    message: str


class JobDefinition(Strict):
    """One migration: the seed's job definition, the `migrate-vm` flow's parameters."""

    vm_identifier: str = Field(min_length=1, max_length=255)
    provider: str = "local"
    export_method: Literal["ova", "ovf", "vmdk"] = "ova"
    export_path: OSPath | None = None
    options: ExportOptions = Field(default_factory=ExportOptions)
    hyper2kvm_integration: Hyper2kvmIntegration = Field(default_factory=Hyper2kvmIntegration)
    # POST /jobs/submit answers what the job would do and what stops it (a DryRun);
    # nothing is created anywhere
    dry_run: bool = False
    # waves: the jobs (ids, or in a submitted list the VMs of other jobs of the list) this
    # one runs after: a cold job starts, a warm one cuts over, once they completed
    after: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(PROVIDER_NAMES)}")
        return value


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # a warm migration between sync rounds, until its cutover
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class FileState(Strict):
    """A file as a step left it: enough to tell, before the step's result is reused, that
    the file is still there and nothing wrote to it since."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileState:
        stat = path.stat()
        return cls(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)

    def changed(self) -> str | None:
        """How the file differs from this state now, or None."""
        try:
            now = FileState.of(self.path)
        except OSError:
            return f"{self.path} is gone"
        return None if now == self else f"{self.path} was written to since"


class ConvertedDisk(Strict):
    source: str
    path: Path
    format: Literal["qcow2", "raw"]
    virtual_size: int
    actual_size: int
    seconds: float
    verified: str | None = None  # the source checksum algorithm checked during conversion
    sha256: str | None = None  # of the output, when asked for


class GuestReport(Strict):
    """What guest conversion (virt-v2v-in-place) found in the guest and changed in it."""

    # False: in "auto" mode it found no OS it can convert; the disks are as copied
    converted: bool = True
    os_type: str | None = None  # linux, windows
    distribution: str | None = None  # debian, rhel, ...
    version: str | None = None
    product: str | None = None
    arch: str | None = None
    firmware: Literal["bios", "efi"] | None = None
    kernels: list[str] = Field(default_factory=list)  # versions installed
    virtio: bool = False  # the guest can boot from virtio disks now
    removed: list[str] = Field(default_factory=list)  # packages uninstalled
    changes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    accelerator: Literal["kvm", "tcg"] = "tcg"
    seconds: float = 0.0


class BootCheck(Strict):
    """The migrated VM booted once on a throwaway overlay: did it come up?"""

    verified: bool
    mode: Literal["warn", "require"]
    seconds: float
    reason: str  # what showed it booted, or why it is thought not to
    watched: bool = True  # False: not booted at all (no OS to wait for), `reason` says why
    starts: bool = True  # the domain as defined started (paused) on this host
    console: list[str] = Field(default_factory=list)  # the console's last lines


class DryRun(Strict):
    """What a job would do and what stops it, found by asking without changing anything."""

    vm: VMInfo  # the hardware the domain would get
    domain_name: str | None  # None: the job does not convert
    disk_bytes: int  # the disks' virtual sizes
    data_bytes: int | None  # what they hold, where the source says
    output_dir: str | None
    output_free_bytes: int | None
    estimated_seconds: float | None  # from this daemon's earlier jobs of the provider
    blockers: list[Blocker] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class SyncRound(Strict):
    """One round of a warm migration's copy (round 0: the precopy)."""

    round: int
    changed_bytes: int
    seconds: float
    final: bool = False  # the VM was off: the copy is exact
    stopped_source: bool = False  # this round powered the source off


class TestBoot(Strict):
    """A warm migration's test boot: guest conversion and the boot check on overlays of
    the copy as it was then (the copy untouched)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    at: datetime
    booted: bool
    reason: str
    seconds: float
    guest_converted: bool | None = None  # None: guest conversion off
    console: list[str] = Field(default_factory=list)  # the console's last lines


class WarmReport(Strict):
    rounds: list[SyncRound] = Field(default_factory=list)
    test_boots: list[TestBoot] = Field(default_factory=list)
    cutover_at: datetime | None = None  # when the cutover began
    # the last round's start → the domain defined (and, with verify_boot, booted)
    downtime_seconds: float | None = None


class MigrationResult(Strict):
    """What a finished migration reports."""

    vm: str
    export: ExportResult
    disks: list[ConvertedDisk] = Field(default_factory=list)
    domain_name: str | None = None
    domain_uuid: str | None = None
    libvirt_uri: str | None = None
    storage_pool: str | None = None
    guest: GuestReport | None = None
    boot: BootCheck | None = None
    warnings: list[str] = Field(default_factory=list)
    step_seconds: dict[str, float] = Field(default_factory=dict)
    warm: WarmReport | None = None  # a warm migration's rounds and downtime


class VMFilter(Strict):
    """The seed's VM filters; every one given must match."""

    datacenter: str | None = None
    status: PowerState | None = None
    tags: list[str] = Field(default_factory=list)
    folder: str | None = None
    name_pattern: str | None = Field(default=None, description="shell-style glob, e.g. web-*")

    def matches(self, vm: VMSummary) -> bool:
        from fnmatch import fnmatchcase

        return (
            (self.datacenter is None or vm.datacenter == self.datacenter)
            and (self.status is None or vm.power_state == self.status)
            and set(self.tags) <= set(vm.tags)
            and (self.folder is None or vm.folder == self.folder)
            and (self.name_pattern is None or fnmatchcase(vm.name, self.name_pattern))
        )


class ConversionOptions(Strict):
    format: Literal["qcow2", "raw"] | None = None  # None: hyper2kvm.default_format
    compression: bool | None = None  # None: hyper2kvm.compression
    preallocation: Literal["off", "metadata", "falloc", "full"] | None = None
    checksum: bool = False  # SHA-256 of each output (one more read of it)


class ConvertRequest(GuestOptions):
    """One conversion: the seed's POST /convert body, the `convert-vm` flow's parameters."""

    source_path: AbsolutePath = Field(min_length=1)
    output_path: OSPath | None = None  # the VM's output folder; default <output_dir>/<vm>
    conversion_options: ConversionOptions = Field(default_factory=ConversionOptions)
    import_to_kvm: bool = False  # also define the libvirt domain (and check it boots)
    autostart: bool = False
    replace: bool = False


class WatchJob(ConvertRequest):
    """A job for a hyper2kvm watch-directory daemon: `<watch_dir>/<job_id>.json`."""

    job_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")


class Retention(Strict):
    """How many successful backups of each VM to keep, and for how long."""

    count: int = Field(default=7, ge=1, le=10000)
    age_days: float | None = Field(default=None, gt=0)


class BackupExportOptions(Strict):
    """What each VM's backup job does: by default an export only (an archive)."""

    export_method: Literal["ova", "ovf", "vmdk"] = "ova"
    options: ExportOptions = Field(default_factory=ExportOptions)
    hyper2kvm_integration: Hyper2kvmIntegration = Field(
        default_factory=lambda: Hyper2kvmIntegration(enabled=False))


class BackupPolicy(Strict):
    """The seed's backup policy: the `backup-policy` flow's parameters."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    provider: str = "vsphere"
    vm_filter: VMFilter = Field(default_factory=VMFilter)
    schedule: str = Field(min_length=1, examples=["0 2 * * *"])
    timezone: str | None = None
    retention: Retention = Field(default_factory=Retention)
    export_options: BackupExportOptions = Field(default_factory=BackupExportOptions)
    concurrency: int = Field(default=2, ge=1, le=64)  # VMs backed up at once

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        return JobDefinition._known_provider(value)  # type: ignore[operator]


class BackupOutcome(Strict):
    vm: str
    job_id: str | None = None
    path: str | None = None
    error: str | None = None


class BackupReport(Strict):
    """What one run of a backup policy did."""

    policy: str
    started_at: str
    backed_up: list[BackupOutcome] = Field(default_factory=list)
    failed: list[BackupOutcome] = Field(default_factory=list)
    pruned: list[str] = Field(default_factory=list)
