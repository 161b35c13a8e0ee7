"""A VM powered off for its export when asked, and on again as soon as its disks are
captured: the one rule every provider that snapshots follows."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from core.models import ExportOptions, PowerState, VMInfo


@contextlib.contextmanager
def power_for_export(vm: VMInfo, options: ExportOptions, *, stop: Callable[[], None],
                     start: Callable[[], None]) -> Iterator[Callable[[], None]]:
    """`stop` a running VM if asked (`shutdown_vm`); yields `restore`, which `start`s it
    again (`restore_power_state`), once, when called as soon as its disks are captured,
    or on the way out at the latest."""
    running = vm.power_state == PowerState.POWERED_ON
    if running and options.shutdown_vm:
        stop()
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored and running and options.shutdown_vm and options.restore_power_state:
            restored = True
            start()

    try:
        yield restore
    finally:
        restore()
