"""The boot check step: the registered VM booted once on throwaway overlays."""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from core.errors import VerificationError
from core.models import BootCheck
from hyper2kvm.boot import BootOutcome, verify_boot
from hyper2kvm.registration import Registered, start_problem, undefine_domain
from tasks.progress import JobProgress

CONSOLE_LINES = 10  # of the console, in the job's error and the Prefect artifact


@task(name="boot-check", persist_result=True)
def check_boot(registered: Registered, *, mode: Literal["warn", "require"], timeout: float,
               pattern: str | None, no_os: str | None = None) -> BootCheck:
    """First the domain as defined starts, paused (its networks, firmware and devices are
    there), then a throwaway copy boots. `require`: a guest that does not come up fails
    the job (and its domain is undefined; the disks stay for a look). `warn`: the job
    completes with the warning. `no_os`: why no login prompt can come (guest conversion
    found no OS); then, unless the job names its own `pattern`, that is the answer,
    without a wait."""
    progress = JobProgress.for_current_run(registered.name)
    progress.start("boot", 0)
    progress.step("starting the domain as defined, paused", 0.0)
    cannot_start = start_problem(registered.uri, registered.name)
    watched = cannot_start is None and (not no_os or pattern is not None)
    if cannot_start is not None:
        outcome = BootOutcome(False, f"{cannot_start} (started paused: the guest never ran)",
                              0.0)
    elif not watched:
        outcome = BootOutcome(False, f"not checked: {no_os}, so no login prompt can come "
                                     "(a boot_pattern makes the check watch for it)", 0.0)
    else:
        progress.step("booting a throwaway copy", 0.0)
        outcome = verify_boot(registered.uri, registered.name, timeout=timeout,
                              pattern=pattern)
    result = BootCheck(verified=outcome.booted, mode=mode, seconds=outcome.seconds,
                       reason=outcome.reason, console=outcome.console,
                       watched=watched, starts=cannot_start is None)
    logger = get_run_logger()
    if outcome.booted:
        logger.info("boot check: %s booted in %.1f s (%s)", registered.name, outcome.seconds,
                    outcome.reason)
    else:
        tail = "\n".join(outcome.console[-CONSOLE_LINES:]) or "(no console output)"
        logger.warning("boot check: %s did not boot: %s; console's last lines:\n%s",
                       registered.name, outcome.reason, tail)
        create_markdown_artifact(
            "\n".join([f"# Boot check of `{registered.name}`: did not boot", "",
                       f"* Mode: {mode}", f"* Reason: {outcome.reason}",
                       f"* Watched for {outcome.seconds} s", "", "Console's last lines:", "",
                       "```", tail, "```"]),
            key=f"boot-check-{progress.slug}", description=f"Boot check of {registered.name}")
        if mode == "require":
            undefine_domain(registered.uri, registered.name)
            raise VerificationError(
                f"boot check failed: {registered.name} did not boot ({outcome.reason}); its "
                f"domain was undefined, its disks kept; console's last lines:\n{tail}")
    progress.finish()
    return result
