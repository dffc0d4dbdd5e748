"""The training-job API (admin only): start, list, follow, cancel and resume training runs."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse

from app.api.auth import RequireAdmin
from app.jobs.runner import JobRunner, JobStateError
from app.jobs.schemas import Job, TrainParams
from app.jobs.service import JobsNotRunHere, TrainingJobs
from app.jobs.store import JobConflict

router = APIRouter(prefix="/train", tags=["training"], dependencies=[RequireAdmin])


def _training(request: Request) -> TrainingJobs:
    return request.app.state.training


def _runner(training: Annotated[TrainingJobs, Depends(_training)]) -> JobRunner:
    try:
        return training.require_runner()
    except JobsNotRunHere as error:
        raise HTTPException(503, str(error)) from None


TrainingDep = Annotated[TrainingJobs, Depends(_training)]
RunnerDep = Annotated[JobRunner, Depends(_runner)]
_RESPONSES = {404: {"description": "no such job"}, 409: {"description": "the job's status does not allow it"},
              503: {"description": "this replica does not run jobs (APP_RUN_JOBS=false)"}}


def _job(training: TrainingJobs, job_id: str) -> Job:
    job = training.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no training job {job_id!r}; GET /train lists the jobs")
    return job


@router.post("", status_code=202, response_model=Job, responses=_RESPONSES)
async def start_job(
    response: Response,
    runner: RunnerDep,
    params: Annotated[TrainParams | None, Body(description="every field optional; {} or no body for defaults")] = None,
) -> Job:
    """Queue a training run and start it; at most one job is queued or running at a time (else 409)."""
    params = params or TrainParams()
    if params.gpus > 1 and params.gpus > torch.cuda.device_count():
        raise RequestValidationError([{
            "loc": ("body", "gpus"), "type": "value_error", "input": params.gpus,
            "msg": f"{params.gpus} GPUs asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)",
        }])
    try:
        job = await runner.submit(params)
    except JobConflict as conflict:
        raise HTTPException(409, str(conflict)) from None
    response.headers["Location"] = f"/train/{job.id}"
    return job


@router.get("", response_model=list[Job])
def list_jobs(training: TrainingDep, limit: Annotated[int | None, Query(ge=1)] = None) -> list[Job]:
    """All jobs, newest first."""
    return training.store.newest_first(limit)


@router.get("/{job_id}", response_model=Job, responses=_RESPONSES)
def get_job(training: TrainingDep, job_id: str) -> Job:
    return _job(training, job_id)


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses=_RESPONSES)
def job_logs(training: TrainingDep, job_id: str,
             tail: Annotated[int | None, Query(ge=0, description="only the last N lines")] = None) -> str:
    """The training process's stdout and stderr, as text."""
    _job(training, job_id)
    return training.logs(job_id, tail)


@router.delete("/{job_id}", response_model=Job, responses=_RESPONSES)
async def cancel_job(training: TrainingDep, runner: RunnerDep, job_id: str) -> Job:
    """Stop a queued or running job (its process group gets SIGTERM, then SIGKILL); its files stay."""
    _job(training, job_id)
    try:
        return await runner.cancel(job_id)
    except JobStateError as error:
        raise HTTPException(409, str(error)) from None


@router.post("/{job_id}/resume", status_code=202, response_model=Job, responses=_RESPONSES)
async def resume_job(training: TrainingDep, runner: RunnerDep, job_id: str, response: Response) -> Job:
    """Continue an interrupted or cancelled job from its last training-state checkpoint."""
    _job(training, job_id)
    try:
        job = await runner.resume(job_id)
    except (JobStateError, JobConflict) as error:
        raise HTTPException(409, str(error)) from None
    response.headers["Location"] = f"/train/{job.id}"
    return job
