"""The steps that make converted disks a VM that boots on KVM, shared by migrate-vm and
convert-vm: guest conversion → register → boot check. Each reuses its persisted result
only while what it made still holds (tasks.reuse)."""

from __future__ import annotations

from typing import Any

from core.config import Hyper2kvmConfig
from core.models import ConvertedDisk, GuestOptions, VMInfo
from flows.report import StepTimer
from hyper2kvm import guest as guest_tool
from hyper2kvm.destination import size_warnings
from hyper2kvm.registration import still_defined
from tasks.boot import check_boot
from tasks.guest import GuestDone, compat_for, convert_guest_os, resolved
from tasks.register import register_domain
from tasks.reuse import proven


def make_bootable(vm: VMInfo, disks: list[ConvertedDisk], settings: Hyper2kvmConfig,
                  options: GuestOptions, *, register: bool, autostart: bool, replace: bool,
                  timed: StepTimer) -> dict[str, Any]:
    """Run the steps `options` (and the config's defaults) ask for; returns the fields
    they add to the MigrationResult."""
    options = resolved(options, settings)
    assert options.verify_boot is not None and options.boot_timeout is not None
    mode = options.convert_guest
    warnings: list[str] = []
    if mode == "auto" and not guest_tool.available():
        warnings.append(f"guest conversion: skipped, {guest_tool.TOOL} is not installed on "
                        "this host (Debian: apt install virt-v2v)")
        mode = False
    guest = None
    if mode:
        guest = timed("guest", lambda: proven(
            GuestDone.changed, convert_guest_os, vm, disks, settings, mode=mode)).report
        warnings += [f"guest conversion: {warning}" for warning in guest.warnings]
    fields: dict[str, Any] = {"guest": guest, "warnings": warnings}
    if not register:
        return fields
    warnings += [f"host: {warning}; the domain is defined as the source had it"
                 for warning in size_warnings(settings.libvirt_uri, vm)]
    compat = compat_for(options, guest)
    registered = timed("register", lambda: proven(
        still_defined, register_domain, vm, disks, settings, autostart=autostart,
        replace=replace, compat=compat))
    fields.update(domain_name=registered.name, domain_uuid=registered.uuid,
                  storage_pool=registered.pool, libvirt_uri=registered.uri)
    verify, timeout = options.verify_boot, options.boot_timeout
    if verify != "off":
        no_os = ("guest conversion found no operating system it can convert"
                 if guest is not None and not guest.converted else None)
        boot = timed("boot", lambda: check_boot(registered, mode=verify, timeout=timeout,
                                                pattern=options.boot_pattern, no_os=no_os))
        if not boot.verified:
            warnings.append(f"boot check: {'the VM did not boot: ' if boot.watched else ''}"
                            f"{boot.reason}")
        fields["boot"] = boot
    return fields
