"""Waves: a job that runs after others (`after`) waits for their runs' final states, and
fails with their reason when one did not complete."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

from core.errors import UpstreamFailed
from tasks.progress import JobProgress

POLL_SECONDS = 2.0


def wait_for_upstream(job_ids: list[str], *, progress: JobProgress) -> None:
    """Until every job of `job_ids` completed."""
    waiting = list(job_ids)
    logger = get_run_logger()
    if waiting:
        logger.info("waiting for job(s) %s to complete first", ", ".join(waiting))
    with get_client(sync_client=True) as client:
        while waiting:
            for job_id in list(waiting):
                run = client.read_flow_run(UUID(job_id))
                if run.state is None or not run.state.is_final():
                    continue
                if run.state.type != StateType.COMPLETED:
                    raise UpstreamFailed(
                        f"job {job_id} ({run.name}), which this job runs after, ended "
                        f"{run.state.name}: {run.state.message or 'no reason given'}")
                waiting.remove(job_id)
                logger.info("job %s (%s) completed", job_id, run.name)
            if waiting:
                progress.step(f"waiting for {len(waiting)} job(s) to complete first: "
                              f"{', '.join(waiting)}", 0.0)
                time.sleep(POLL_SECONDS)
