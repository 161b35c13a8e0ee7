"""What an export asks of Azure RBAC, asked before anything is made: Microsoft.Authorization's
permissions API answers, per resource group, the actions the caller's role assignments
allow and those they exclude (`actions` / `notActions`, with wildcards)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from core.errors import AuthFailed
from core.models import Blocker, ExportOptions, PowerState, VMInfo
from providers.azure.inventory import parse_id
from providers.azure.session import Clients, call

log = logging.getLogger(__name__)
# in each disk's resource group: its snapshots are made, read and removed there
SNAPSHOT_ACTIONS = (
    "Microsoft.Compute/disks/read",
    "Microsoft.Compute/snapshots/read",
    "Microsoft.Compute/snapshots/write",
    "Microsoft.Compute/snapshots/delete",
    "Microsoft.Compute/snapshots/beginGetAccess/action",
    "Microsoft.Compute/snapshots/endGetAccess/action",
)
# in the VM's resource group, when a running VM is to be stopped for its export
POWER_ACTIONS = (
    "Microsoft.Compute/virtualMachines/deallocate/action",
    "Microsoft.Compute/virtualMachines/start/action",
)


def _matches(action: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatchcase(action.lower(), pattern.lower()) for pattern in patterns or [])


def allowed(action: str, permissions: list[Any]) -> bool:
    """Whether some role assignment allows `action` (a permission's notActions only take
    away from its own actions)."""
    return any(_matches(action, p.actions) and not _matches(action, p.not_actions)
               for p in permissions)


def permission_blockers(clients: Clients, vm: VMInfo, options: ExportOptions) -> list[Blocker]:
    """Each resource group where the export would be refused an action, with the actions."""
    vm_group = vm.identifier.split("/")[0]
    needs: dict[str, list[str]] = {}
    for disk in vm.disks:
        needs.setdefault(parse_id(str(disk.datastore))[0], []).extend(SNAPSHOT_ACTIONS)
    if options.shutdown_vm and vm.power_state == PowerState.POWERED_ON:
        needs.setdefault(vm_group, []).extend(POWER_ACTIONS)
    blockers = []
    for group, actions in sorted(needs.items()):
        try:
            permissions = call(lambda g=group: list(
                clients.authorization.permissions.list_for_resource_group(g)),
                f"Azure permissions in {group}")
        except AuthFailed as exc:
            log.warning("Azure permissions in %s not checked: %s", group, exc)
            continue
        missing = sorted({a for a in actions if not allowed(a, permissions)})
        if missing:
            blockers.append(Blocker(code="permission_denied", message=(
                f"in resource group {group} the credentials may not {', '.join(missing)}: "
                "assign them a role that allows these actions (the README's Azure section "
                "has one)")))
    return blockers
