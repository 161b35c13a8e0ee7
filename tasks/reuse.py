"""A persisted step is reused only if what it made is still there and the same.

Every step persists its result, so a retried or resumed run skips what finished. But a
later step may have removed or changed what an earlier one made (a failed guest step
removes the disks, a `require`-failed boot check undefines the domain, a crash leaves
partial files that the sweep removes), and a result that names what is gone must not be
reused. `proven` asks the step's own check of its outputs and, when they no longer hold,
runs the step again (Prefect's `refresh_cache`, which stores the new result in place of
the old one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prefect import Task, get_run_logger

P = ParamSpec("P")
R = TypeVar("R")

Check = Callable[[R], str | None]  # what no longer holds, or None


def proven(check: Check[R], step: Task[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`step(*args, **kwargs)`, cached or not, once `check` accepts what it returned."""
    result = step(*args, **kwargs)
    problem = check(result)
    if problem is None:
        return result
    get_run_logger().warning("step %s: its earlier result no longer holds (%s); running it "
                             "again", step.name, problem)
    result = step.with_options(refresh_cache=True)(*args, **kwargs)
    problem = check(result)
    if problem is not None:  # what the step just made fails its own check: a bug, say so
        raise RuntimeError(f"step {step.name} made outputs that fail their check: {problem}")
    return result
