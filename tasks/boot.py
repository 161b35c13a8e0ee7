"""The boot check step: the registered VM booted once on throwaway overlays."""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task

from core.errors import VerificationError
from core.models import BootCheck
from hyper2kvm.boot import verify_boot
from hyper2kvm.registration import Registered, undefine_domain
from tasks.progress import JobProgress


@task(name="boot-check", persist_result=True)
def check_boot(registered: Registered, *, mode: Literal["warn", "require"], timeout: float,
               pattern: str | None) -> BootCheck:
    """`require`: a guest that does not come up fails the job (and its domain is
    undefined; the disks stay for a look). `warn`: the job completes with the warning."""
    progress = JobProgress.for_current_run(registered.name)
    progress.start("boot", 0)
    progress.step("booting a throwaway copy", 0.0)
    outcome = verify_boot(registered.uri, registered.name, timeout=timeout, pattern=pattern)
    result = BootCheck(verified=outcome.booted, mode=mode, seconds=outcome.seconds,
                       reason=outcome.reason, console=outcome.console)
    logger = get_run_logger()
    if outcome.booted:
        logger.info("boot check: %s booted in %.1f s (%s)", registered.name, outcome.seconds,
                    outcome.reason)
    else:
        tail = "\n".join(outcome.console[-10:]) or "(no console output)"
        logger.warning("boot check: %s did not boot: %s; console's last lines:\n%s",
                       registered.name, outcome.reason, tail)
        if mode == "require":
            undefine_domain(registered.uri, registered.name)
            raise VerificationError(f"boot check failed: {registered.name} did not boot "
                                    f"({outcome.reason}); its domain was undefined, its "
                                    "disks kept")
    progress.finish()
    return result
