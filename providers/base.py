"""The provider interface and the registry that maps names to drivers."""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self

from core.config import Config, ProviderConfig
from core.errors import InvalidRequest, Unsupported
from core.models import Blocker, ExportOptions, ExportResult, VMFilter, VMInfo, VMSummary
from hyper2kvm.output import OutputImage

BytesProgress = Callable[[int], None]  # called with bytes just moved


@dataclass(frozen=True)
class WarmRound:
    """What one round of a warm migration did."""

    changed_bytes: int  # written into the images
    stopped_source: bool = False  # the final round powered the source off (rollback starts it)

# (disk index, virtual size in bytes) → that disk's output image, open for writing
OpenOutput = Callable[[int, int], OutputImage]
# "disks": asked by a job that converts; the disks in whatever form is cheapest to hand to
# conversion (no packaging the job would throw away)
ExportMethod = Literal["ova", "ovf", "vmdk", "disks"]

# name → (driver class path, what to install when its SDK is missing)
_DRIVERS: dict[str, tuple[str, str | None]] = {
    "local": ("providers.local:LocalProvider", None),
    "vsphere": ("providers.vsphere:VSphereProvider", "pip install 'hypersdk[vsphere]'"),
    "aws": ("providers.aws:AWSProvider", "pip install 'hypersdk[aws]'"),
    "azure": ("providers.azure:AzureProvider", "pip install 'hypersdk[azure]'"),
    "gcp": ("providers.gcp:GCPProvider", "pip install 'hypersdk[gcp]'"),
    "oci": ("providers.oci:OCIProvider", "pip install 'hypersdk[oci]'"),
    "hyperv": ("providers.hyperv:HyperVProvider", "pip install 'hypersdk[hyperv]'"),
}


class Provider(ABC):
    """One source platform. Usable as a context manager; `close()` releases sessions."""

    name: ClassVar[str]

    def __init__(self, config: ProviderConfig, *, settings: Config) -> None:
        self.config = config
        self.settings = settings

    @abstractmethod
    def list_vms(self, vm_filter: VMFilter) -> list[VMSummary]:
        """VMs matching the filter."""

    @abstractmethod
    def get_vm(self, identifier: str) -> VMInfo:
        """One VM's hardware; raises NotFound."""

    @abstractmethod
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
        """Write the VM under `dest` packaged as `method`. Whatever the export creates in
        the source account (snapshots, export objects) is tagged with `job`, so that
        `discard(job)` finds it after a cancel or a crash."""

    def stream(
        self,
        identifier: str,
        open_output: OpenOutput,
        *,
        options: ExportOptions,
        progress: BytesProgress | None = None,
        job: str | None = None,
    ) -> VMInfo | None:
        """The one-pass path: write each disk's bytes straight into the output image
        `open_output` gives for it (copied from an NBD source, or written at offsets), no
        copy in between; the VM as exported. None, before any output is opened: this
        platform, or this VM's disk layout, is not streamed, and the job exports and
        converts in two passes. Platforms whose export already reads disks in place
        (local) have nothing to gain."""
        return None

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
        """One round of a warm migration: bring each disk's image in `outputs` (the VM's
        disks in order; on the first round, empty) up to date with the disk as it is now,
        writing only what changed since the last round. `final`: the
        VM is off (stopped first where `options.shutdown_vm` asks; else its last state
        is taken), so the copy becomes exact. Raises
        Unsupported where the platform cannot tell what changed."""
        raise Unsupported(f"warm migration is not available for provider {self.name}")

    def power_on(self, identifier: str) -> None:
        """Start the source VM again (a rollback after a cutover that stopped it)."""
        raise Unsupported(f"provider {self.name} cannot power a VM on")

    def blockers(self, vm: VMInfo, options: ExportOptions, *, converts: bool) -> list[Blocker]:
        """What would stop an export of `vm` that only the platform can say, asked without
        changing anything (permissions, encryption, disks it cannot read). Platforms that
        can tell say so here; the rest answer none."""
        return []

    def check_export(self, vm: VMInfo, options: ExportOptions, *,  # noqa: B027
                     converts: bool) -> None:
        """Raise InvalidRequest, before a job is queued, for an export of `vm` that cannot
        work on this platform (a transport it lacks, a documented limit). Platforms with
        no such limits have nothing to check."""

    def discard(self, job: str) -> list[str]:
        """Remove what exports of `job` created in the source account and left behind
        (a cancelled or crashed run's snapshots); returns what was removed. Platforms
        whose exports create nothing there have nothing to remove."""
        return []

    @abstractmethod
    def check(self) -> None:
        """Prove, cheaply, that the platform answers and accepts the credentials; raise
        the provider error saying why not."""

    def close(self) -> None:  # noqa: B027 - most drivers hold nothing to release
        """Release connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def job_label(job: str | None) -> str:
    """A job id as a name part or tag value in the source account (letters, digits, - and
    _), for what an export leaves there to be found again by `discard`."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", job or "adhoc")[:64]


def known_providers() -> list[str]:
    """Provider names that have a driver."""
    return list(_DRIVERS)


def get_provider(name: str, settings: Config) -> Provider:
    """The driver for `name`, configured from `settings.providers.<name>`."""
    section = settings.providers.enabled().get(name)
    if section is None:
        raise InvalidRequest(f"provider {name!r} is not configured (or disabled) in providers:")
    if name not in _DRIVERS:
        raise Unsupported(f"provider {name!r} has no driver in this version of hypersdk")
    return _driver(name)(section, settings=settings)


def streams(name: str) -> bool:
    """Whether the driver for `name` has the one-pass path (overrides `stream`)."""
    return name in _DRIVERS and _driver(name).stream is not Provider.stream


def copies_warm(name: str) -> bool:
    """Whether the driver for `name` migrates warm (overrides `warm_round`)."""
    return name in _DRIVERS and _driver(name).warm_round is not Provider.warm_round


def _driver(name: str) -> type[Provider]:
    target, install = _DRIVERS[name]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; {install}" if install else ""
        raise Unsupported(f"provider {name!r} needs a missing package ({exc.name}){hint}") from None
    driver: type[Provider] = getattr(module, class_name)
    return driver
