"""Jobs: GET /jobs/{id}, the status and progress of any job."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from app import jobs
from app.deps import OperatorDep, SessionDep, SettingsDep
from app.orm import Job
from app.routes.common import ERRORS, JobId
from app.schemas import JobPublic

router = APIRouter(tags=["jobs"], responses=ERRORS)


@router.get("/jobs/{job_id}", response_model=JobPublic, summary="Status and progress of a job")
def get_job(job_id: JobId, _: OperatorDep, s: SessionDep, settings: SettingsDep) -> JobPublic:
    """A queued job says how many jobs of its queue are ahead of it; a running one whose worker
    stopped reporting says it is stale."""
    job = s.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return jobs.job_public(s, job, settings)
