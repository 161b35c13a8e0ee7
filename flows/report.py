"""What a finished flow run leaves in the Prefect UI: a markdown report, and the timing of
its steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prefect.artifacts import create_markdown_artifact

from core.models import MigrationResult

T = TypeVar("T")


class StepTimer:
    """Runs steps and remembers how long each took: `timed("export", lambda: ...)`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return call()
        finally:
            self.seconds[step] = round(time.monotonic() - started, 3)


def report_markdown(result: MigrationResult, *, title: str, source: str,
                    handoff: Path | None = None) -> str:
    vm = result.export.vm
    lines = [
        f"# {title}",
        "",
        f"* Source: {source}",
        f"* Hardware: {vm.cpus} vCPU, {vm.memory_mb} MiB, firmware {vm.firmware}"
        f"{' (secure boot)' if vm.secure_boot else ''}, {len(vm.disks)} disk(s), "
        f"{len(vm.nics)} NIC(s)",
    ]
    if result.domain_name:
        lines.append(f"* libvirt domain: `{result.domain_name}` ({result.domain_uuid}) on "
                     f"`{result.libvirt_uri}`")
    if handoff:
        lines.append(f"* Handed to the hyper2kvm daemon: `{handoff}`")
    if result.guest and not result.guest.converted:
        lines.append("* Guest: not converted (no operating system it can convert); disks as "
                     "copied, compatible hardware")
    elif result.guest:
        guest = result.guest
        lines.append(f"* Guest: {guest.distribution or guest.os_type or 'unknown OS'} "
                     f"{guest.version or ''} ({guest.arch or '?'}, {guest.firmware or '?'}), "
                     f"kernels {', '.join(guest.kernels) or '-'}; virtio drivers: "
                     f"{'yes' if guest.virtio else 'no (compat mode)'}; converted in "
                     f"{guest.seconds} s ({guest.accelerator})")
        lines += [f"  * changed: {change}" for change in guest.changes]
    if result.boot:
        boot = result.boot
        lines.append(f"* Boot check ({boot.mode}): "
                     f"{'booted' if boot.verified else 'DID NOT BOOT'} in {boot.seconds} s "
                     f"— {boot.reason}")
    lines += [f"* **Warning:** {warning}" for warning in result.warnings]
    lines += ["", "| exported file | bytes | SHA-256 |", "|---|---:|---|"]
    lines += [f"| {f.path.name} | {f.size:,} | {f.sha256 or '-'} |" for f in result.export.files]
    if result.disks:
        lines += ["", "| disk | output | format | virtual bytes | on disk | seconds | source "
                  "verified | output SHA-256 |", "|---|---|---|---:|---:|---:|---|---|"]
        lines += [f"| {d.source} | `{d.path}` | {d.format} | {d.virtual_size:,} | "
                  f"{d.actual_size:,} | {d.seconds} | {d.verified or '-'} | {d.sha256 or '-'} |"
                  for d in result.disks]
    if result.boot and result.boot.console:
        lines += ["", "Console's last lines:", "", "```", *result.boot.console[-15:], "```"]
    lines += ["", "| step | seconds |", "|---|---:|"]
    lines += [f"| {step} | {seconds} |" for step, seconds in result.step_seconds.items()]
    return "\n".join(lines)




def publish_report(result: MigrationResult, *, title: str, source: str, key: str,
                   handoff: Path | None = None) -> None:
    create_markdown_artifact(report_markdown(result, title=title, source=source,
                                             handoff=handoff),
                             key=key, description=title.replace("`", ""))
