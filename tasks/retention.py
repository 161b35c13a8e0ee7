"""Backups on disk and their retention: `<export base>/<policy>/<vm>/<stamp>/`, each with
a marker saying whether it is running, completed or failed.

Only completed backups count towards `retention.count`, the newest completed one is never
deleted, running (or unmarked) backups are never touched, and failed ones go once they are
older than `retention.age_days`. A backup still marked running whose policy run has ended
(the run crashed or was killed before it could say) counts as failed."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.files import fsync_path
from core.models import Retention

STAMP = "%Y%m%dT%H%M%SZ"
MARKER = ".hypersdk-backup.json"


@dataclass(frozen=True)
class Backup:
    path: Path
    taken_at: datetime
    status: str  # running, completed, failed; unknown when the marker is missing
    run_id: str | None = None  # the backup-policy flow run that writes it


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(STAMP)


def write_marker(folder: Path, **facts: Any) -> None:
    """Replace the marker atomically and durably: a reader never sees half of it, and
    after a power cut the folder holds this marker or the one before it."""
    partial = folder / f"{MARKER}.partial"
    partial.write_text(json.dumps(facts, default=str))
    fsync_path(partial)
    partial.replace(folder / MARKER)
    fsync_path(folder)


def read_backups(vm_folder: Path) -> list[Backup]:
    backups = []
    for child in sorted(vm_folder.iterdir()) if vm_folder.is_dir() else []:
        try:
            taken = datetime.strptime(child.name, STAMP).replace(tzinfo=UTC)
        except ValueError:
            continue  # not one of ours
        status, run_id = "unknown", None
        marker = child / MARKER
        if child.is_dir() and marker.is_file():
            try:
                facts = json.loads(marker.read_text())
                status = str(facts.get("status", "unknown"))
                run_id = str(facts["policy_run"]) if facts.get("policy_run") else None
            except (ValueError, AttributeError):
                status = "unknown"
        backups.append(Backup(path=child, taken_at=taken, status=status, run_id=run_id))
    return backups


def plan_pruning(backups: list[Backup], retention: Retention, now: datetime, *,
                 ended_runs: frozenset[str] = frozenset()) -> list[Backup]:
    """The backups retention removes (see the module's docstring); `ended_runs`: policy
    runs that are over, so their backups still marked running were interrupted."""
    backups = [replace(b, status="failed") if b.status == "running" and b.run_id in ended_runs
               else b for b in backups]
    max_age = timedelta(days=retention.age_days) if retention.age_days else None
    completed = sorted((b for b in backups if b.status == "completed"),
                       key=lambda b: b.taken_at, reverse=True)
    doomed = [b for index, b in enumerate(completed)
              if index > 0 and (index >= retention.count
                                or (max_age is not None and now - b.taken_at > max_age))]
    if max_age is not None:
        doomed += [b for b in backups if b.status == "failed" and now - b.taken_at > max_age]
    return sorted(doomed, key=lambda b: b.taken_at)


def prune(vm_folder: Path, retention: Retention, now: datetime, *,
          ended_runs: frozenset[str] = frozenset()) -> list[Path]:
    """Apply retention to one VM's backups; returns what was deleted."""
    deleted = []
    root = vm_folder.resolve()
    for backup in plan_pruning(read_backups(vm_folder), retention, now, ended_runs=ended_runs):
        target = backup.path.resolve()
        if target.parent != root:  # a link pointing elsewhere: never follow it
            continue
        shutil.rmtree(target)
        deleted.append(backup.path)
    return deleted
