"""The steps that make converted disks a VM that boots on KVM, shared by migrate-vm and
convert-vm: guest conversion → register → boot check."""

from __future__ import annotations

from typing import Any

from core.config import Hyper2kvmConfig
from core.models import ConvertedDisk, GuestOptions, VMInfo
from flows.report import StepTimer
from tasks.boot import check_boot
from tasks.guest import convert_guest_os, resolved
from tasks.register import register_domain


def make_bootable(vm: VMInfo, disks: list[ConvertedDisk], settings: Hyper2kvmConfig,
                  options: GuestOptions, *, register: bool, autostart: bool, replace: bool,
                  timed: StepTimer) -> dict[str, Any]:
    """Run the steps `options` (and the config's defaults) ask for; returns the fields
    they add to the MigrationResult."""
    options = resolved(options, settings)
    assert options.verify_boot is not None and options.boot_timeout is not None
    guest = (timed("guest", lambda: convert_guest_os(vm, disks, settings))
             if options.convert_guest else None)
    warnings = [f"guest conversion: {warning}" for warning in (guest.warnings if guest else [])]
    fields: dict[str, Any] = {"guest": guest, "warnings": warnings}
    if not register:
        return fields
    compat = options.compat_mode
    if compat is None and guest is not None:
        compat = not guest.virtio  # virtio only where the guest has the drivers
    registered = timed("register", lambda: register_domain(
        vm, disks, settings, autostart=autostart, replace=replace, compat=compat))
    fields.update(domain_name=registered.name, domain_uuid=registered.uuid,
                  storage_pool=registered.pool, libvirt_uri=registered.uri)
    mode, timeout = options.verify_boot, options.boot_timeout
    if mode != "off":
        boot = timed("boot", lambda: check_boot(registered, mode=mode, timeout=timeout,
                                                pattern=options.boot_pattern))
        if not boot.verified:
            warnings.append(f"boot check: the VM did not boot: {boot.reason}")
        fields["boot"] = boot
    return fields
