"""What an export made in the source account (snapshots, images, export objects)
outlives a transient failure: the export task is retried (`tasks.export.only_transient`)
and finds it again by the job's tag instead of making it again, and the parts already
read resume from the disk (`providers.ranged`). Any other end of an export removes it,
unless the job asked to keep it; after the last retry failed, or a cancel or a crash, the
flow's hook removes what is left (`Provider.discard`)."""

from __future__ import annotations

import logging

from core.errors import is_transient
from core.models import ExportOptions

log = logging.getLogger(__name__)


def kept(what: str, names: list[str], *, options: ExportOptions,
         failure: BaseException | None) -> bool:
    """Whether to leave `names` (`what`: "snapshots", ...) in the account, said in the log:
    the job keeps them, or a transient failure's retry will use them."""
    if not names:
        return False
    if options.keep_snapshots:
        log.info("%s kept: %s", what, ", ".join(names))
        return True
    if failure is not None and is_transient(failure):
        log.info("%s kept for the export's retry: %s", what, ", ".join(names))
        return True
    return False
