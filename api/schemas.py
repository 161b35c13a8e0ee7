"""Request and response bodies of the REST API, with the seed's field names."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.models import DryRun, JobDefinition, JobStatus, VMFilter, VMSummary


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every error answer: its kind, a message that says what is wrong, and for invalid
    fields one entry per field."""

    error: str
    message: str
    detail: list[dict[str, Any]] | None = None


# the error answers any operation may give, documented on every one (api/main.py)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": description} for code, description in (
        (400, "the body is not text a JSON parser can read (e.g. not UTF-8)"),
        (401, "no API key, or a wrong one"),
        (404, "no such job, VM, schedule, policy or webhook"),
        (409, "not possible in the object's current state (e.g. the VM has a job running)"),
        (413, "request body over daemon.max_body_bytes"),
        (422, "the request is not valid: the message names the field and the problem"),
        (500, "an unexpected error (logged by the daemon)"),
        (501, "the provider cannot do that"),
        (502, "the provider or libvirt refused (e.g. wrong credentials)"),
        (503, "the provider or Prefect cannot be reached now; try again"),
    )
}


class Health(BaseModel):
    status: str
    version: str
    prefect: dict[str, Any]
    websocket_clients: int = 0


class VMListRequest(Body):
    provider: str = "local"
    filter: VMFilter = Field(default_factory=VMFilter)


class VMList(BaseModel):
    provider: str
    count: int
    vms: list[VMSummary]


class JobSubmitted(BaseModel):
    job_id: str
    status: JobStatus
    created_at: datetime


class JobsSubmitted(BaseModel):
    jobs: list[JobSubmitted]


class DryRuns(BaseModel):
    jobs: list[DryRun]


class JobInfo(BaseModel):
    job_id: str
    name: str
    status: JobStatus
    state: str
    vm_identifier: str | None
    provider: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = None
    result: dict[str, Any] | None = None
    definition: dict[str, Any] | None = None
    rolled_back_at: datetime | None = None  # a warm job rolled back after its cutover
    rollback: str | None = Field(default=None, description="what the rollback did")


class JobList(BaseModel):
    jobs: list[JobInfo]
    total: int
    limit: int
    offset: int


class JobProgress(BaseModel):
    job_id: str
    status: JobStatus
    phase: str
    step: str | None = Field(default=None, description="what the phase is doing, where it "
                             "counts no bytes (guest conversion, boot check)")
    percentage: float
    bytes_done: int
    bytes_total: int
    rate_bps: float
    eta_seconds: float | None
    updated_at: datetime | None
    round: int | None = Field(default=None, description="a warm migration's last sync "
                              "round (0: the precopy)")
    changed_bytes: int | None = Field(default=None, description="bytes the last round wrote")
    estimated_downtime_seconds: float | None = Field(
        default=None, description="the last round's duration: about what a cutover now costs")


class JobEta(BaseModel):
    job_id: str
    status: JobStatus
    percentage: float
    elapsed_seconds: float
    eta_seconds: float | None
    estimated_completion: datetime | None


class LogLine(BaseModel):
    timestamp: datetime
    level: str
    logger: str
    message: str


class JobLogs(BaseModel):
    job_id: str
    status: JobStatus
    logs: list[LogLine]


class JobRef(Body):
    job_id: str


class CutoverRequest(JobRef):
    at: datetime | None = Field(default=None, description="when to cut over (UTC unless "
                                "the time says); empty or past: now")


class RollbackRequest(JobRef):
    remove_disks: bool = Field(default=False, description="remove the migrated disks too "
                               "(default: kept, for a look or a second cutover)")


class JobAction(BaseModel):
    job_id: str
    status: str
    message: str


SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ScheduleCreate(Body):
    """The seed's POST /schedules/create body."""

    name: str = Field(pattern=SLUG)
    cron: str = Field(min_length=1, examples=["0 2 * * *"])
    timezone: str | None = Field(default=None, examples=["Europe/Paris"])
    active: bool = True
    job_definition: JobDefinition


class ScheduleUpdate(Body):
    cron: str | None = None
    timezone: str | None = None
    active: bool | None = None
    job_definition: JobDefinition | None = None


class ScheduleInfo(BaseModel):
    name: str
    id: str
    cron: str | None
    timezone: str | None
    active: bool
    job_definition: dict[str, Any] | None
    next_runs: list[datetime]
    created_at: datetime | None
    updated_at: datetime | None


class ScheduleList(BaseModel):
    schedules: list[ScheduleInfo]


class BackupPolicyInfo(BaseModel):
    name: str
    id: str
    active: bool
    policy: dict[str, Any] | None
    next_runs: list[datetime]
    created_at: datetime | None
    updated_at: datetime | None


class BackupPolicyList(BaseModel):
    policies: list[BackupPolicyInfo]
