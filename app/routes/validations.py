"""Validation experiments as jobs: POST /validations turns its body into the experiment's config
(experiments/), which a worker runs as `attrib validate` runs the same flags; GET
/validations/{job_id} gives its report and figures.

Handlers only check the request and write the job; the worker trains, samples, ablates.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Path, Response
from sqlalchemy import func, select

from app import jobs
from app.deps import LimitedOperatorDep, OperatorDep, SessionDep, SettingsDep, WriterDep
from app.orm import Dataset, Image, Job
from app.routes.common import ERRORS, PNG, IdempotencyKey, JobId, Offset, PageSize, check_limit, png_response
from app.routes.lookups import ensemble_for, key_in_use, replay, sampling_steps
from app.schemas import (
    ValidationAccepted,
    ValidationCreate,
    ValidationPage,
    ValidationPublic,
    ValidationRequest,
    ValidationSummary,
    validation_config,
    validation_flags,
)
from app.settings import Settings
from app.writer import Tx

router = APIRouter(tags=["validation"], responses=ERRORS)


@router.post("/validations", status_code=202, response_model=ValidationAccepted,
             summary="Run a validation experiment (asynchronously)")
async def create_validation(body: ValidationCreate, _: LimitedOperatorDep, writer: WriterDep,
                            settings: SettingsDep,
                            idempotency_key: IdempotencyKey = None) -> ValidationAccepted:
    """Queues the experiment with the given fields as its options (those of `attrib validate
    EXPERIMENT`'s flags of the same names). A worker trains the experiment's ensemble (or uses
    `ensemble_id`'s), runs it and stores the report and its PNG figures: poll
    `GET /validations/{job_id}`. Minutes on a CPU at the default sizes."""
    if body.samples is not None:
        check_limit("max_validation_samples", body.samples, settings, "samples")
    if body.train is not None and body.train.train_steps is not None:
        check_limit("max_validation_train_steps", body.train.train_steps, settings, "train.train_steps")
    if body.steps is not None:
        check_limit("max_steps", body.steps, settings, "steps")
    return await writer.run(lambda tx: _create(tx, body, settings, idempotency_key))


def _create(tx: Tx, body: ValidationRequest, settings: Settings,
            idempotency_key: str | None) -> ValidationAccepted:
    s = tx.s
    old = replay(s, idempotency_key, "validate")
    if old is None:
        config = validation_config(body, _ensemble_source(tx, body, settings))
        with key_in_use(idempotency_key):
            payload = {"experiment": body.experiment, "config": config.model_dump(mode="json"),
                       "options": validation_flags(config),
                       "request": body.model_dump(mode="json", exclude_unset=True)}
            job_id = jobs.new_job(s, "validate", payload, idempotency_key=idempotency_key)
        tx.publish.append(job_id)
    else:
        job_id = old.id
    return ValidationAccepted(job_id=job_id, experiment=str(body.experiment), url=f"/validations/{job_id}")


def _ensemble_source(tx: Tx, body: ValidationRequest, settings: Settings) -> dict[str, Any]:
    """The checkpoint of ensemble_id, or the data (and subset) of train.dataset_id, as options of
    the experiment's config (paths never come from a request)."""
    s = tx.s
    ensemble_id = getattr(body, "ensemble_id", None)
    if ensemble_id is not None:
        ens = ensemble_for(tx, ensemble_id)  # 404 / 409 as for /generate
        if body.steps is not None:
            sampling_steps(body.steps, ens, settings)
        return {"checkpoint": ens.checkpoint}
    train = body.train
    if train is None or train.dataset_id is None:
        return {}
    ds = s.get(Dataset, train.dataset_id)
    if ds is None:
        raise HTTPException(404, f"dataset {train.dataset_id} not found")
    spec = ds.spec or {}
    if not isinstance(spec.get("data"), str):
        raise HTTPException(409, f"dataset {ds.id} ({ds.name}) has no data source to train on")
    out: dict[str, Any] = {"data": spec["data"]}
    if spec.get("subset") is not None:
        if train.subset is not None:
            raise HTTPException(409, f"dataset {ds.id} ({ds.name}) is itself a subset of {spec['data']!r}; "
                                "leave out train.subset (or register the whole data)")
        out |= {"subset": int(spec["subset"]), "subset_seed": int(spec.get("subset_seed") or 0)}
    return out


@router.get("/validations", response_model=ValidationPage, summary="Validations, newest first")
def list_validations(_: OperatorDep, s: SessionDep, settings: SettingsDep, offset: Offset = 0,
                     limit_: PageSize = 100) -> ValidationPage:
    check_limit("max_page_size", limit_, settings, "limit")
    total = s.scalar(select(func.count()).select_from(Job).where(Job.kind == "validate")) or 0
    jobs_ = s.scalars(select(Job).where(Job.kind == "validate")
                      .order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit_))
    items = [ValidationSummary(**_summary(j)) for j in jobs_]
    return ValidationPage(items=items, total=total, offset=offset, limit=limit_)


def _summary(job: Job) -> dict[str, Any]:
    return dict(job_id=job.id, url=f"/validations/{job.id}", experiment=str(job.payload["experiment"]),
                status=job.status, progress=job.progress,
                passed=None if job.result is None else job.result.get("passed"),
                created_at=job.created_at, finished_at=job.finished_at)


def _public(job: Job) -> ValidationPublic:
    result = job.result or {}
    return ValidationPublic(
        **_summary(job), request=job.payload.get("request", {}), options=list(job.payload["options"]),
        error=job.error, report=result.get("report"),
        figures={name: f"/validations/{job.id}/figures/{name}" for name in result.get("figures", {})})


def _validation(s: Any, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None or job.kind != "validate":
        raise HTTPException(404, f"validation {job_id} not found")
    return job  # type: ignore[no-any-return]


@router.get("/validations/{job_id}", response_model=ValidationPublic, summary="A validation and its report")
def get_validation(job_id: JobId, _: OperatorDep, s: SessionDep) -> ValidationPublic:
    return _public(_validation(s, job_id))


@router.get("/validations/{job_id}/figures/{name}", responses=PNG, response_class=Response,
            summary="A figure of a finished validation")
def get_validation_figure(job_id: JobId, _: OperatorDep, s: SessionDep,
                          name: str = Path(max_length=100, description="a figure name, e.g. copies.png")
                          ) -> Response:
    job = _validation(s, job_id)
    sha = (job.result or {}).get("figures", {}).get(name)
    if sha is None:
        raise HTTPException(404, f"validation {job_id} has no figure {name!r}"
                            + ("" if job.status == "succeeded" else f" (it is {job.status})"))
    img = s.get(Image, sha)
    if img is None:
        raise HTTPException(404, f"figure {name!r} of validation {job_id} is missing")
    return png_response(img.png)

