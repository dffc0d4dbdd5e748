"""The training-job API (admin only): start, list, follow, cancel and resume training runs.

Served by the control plane (``app/control/service.py``); a serving replica forwards these routes to it
(``app/api/forward.py``) and includes them only so that its OpenAPI document describes them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse

from app.api.deps import ControlPlaneDep, JobRunnerDep, RequireAdmin
from app.control.jobs.schemas import Job, TrainParams

router = APIRouter(prefix="/train", tags=["training"], dependencies=[RequireAdmin])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such job"},
    409: {"description": "the job's status does not allow it"},
    503: {"description": "no control plane here (APP_RUN_JOBS=false), or it cannot be reached now (retry)"},
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: _RESPONSES[503]}


@router.post("", status_code=202, response_model=Job, responses=_RESPONSES)
async def start_job(
    response: Response,
    runner: JobRunnerDep,
    params: Annotated[TrainParams | None, Body(description="every field optional; {} or no body for defaults")] = None,
) -> Job:
    """Queue a training run and start it; at most one job is queued or running at a time (else 409)."""
    params = params or TrainParams()
    if params.gpus > 1:
        # torch counts the devices; imported only for a multi-GPU job, so the control plane, which serves this
        # route, starts without it (its restarts share the serving process's cores: benchmarks/control_start.py).
        import torch

        if params.gpus > torch.cuda.device_count():
            # A 422 like any other invalid field; checked here, not in TrainParams, because it depends on this
            # machine, and stored jobs must stay readable on any machine.
            raise RequestValidationError([{
                "loc": ("body", "gpus"), "type": "value_error", "input": params.gpus,
                "msg": f"{params.gpus} GPUs asked for, but this machine has {torch.cuda.device_count()} CUDA "
                       "device(s)",
            }])
    job = await runner.submit(params)
    response.headers["Location"] = f"/train/{job.id}"
    return job


# SQLite's largest integer: a larger LIMIT overflowed in the job store, a 500 schemathesis found.
MOST_JOBS = 2**63 - 1


@router.get("", response_model=list[Job], responses=_UNAVAILABLE)
def list_jobs(control_plane: ControlPlaneDep,
              limit: Annotated[int | None, Query(ge=1, le=MOST_JOBS)] = None) -> list[Job]:
    """All jobs, newest first."""
    return control_plane.store.newest_first(limit)


@router.get("/{job_id}", response_model=Job, responses=_RESPONSES)
def get_job(control_plane: ControlPlaneDep, job_id: str) -> Job:
    return control_plane.job(job_id)


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses=_RESPONSES)
def job_logs(control_plane: ControlPlaneDep, job_id: str,
             tail: Annotated[int | None, Query(ge=0, description="only the last N lines")] = None) -> str:
    """The training process's stdout and stderr, as text."""
    return control_plane.logs(job_id, tail)


@router.delete("/{job_id}", response_model=Job, responses=_RESPONSES)
async def cancel_job(runner: JobRunnerDep, job_id: str) -> Job:
    """Stop a queued or running job (its process group gets SIGTERM, then SIGKILL); its files stay."""
    return await runner.cancel(job_id)


@router.post("/{job_id}/resume", status_code=202, response_model=Job, responses=_RESPONSES)
async def resume_job(runner: JobRunnerDep, job_id: str, response: Response) -> Job:
    """Continue an interrupted or cancelled job from its last training-state checkpoint."""
    job = await runner.resume(job_id)
    response.headers["Location"] = f"/train/{job.id}"
    return job
