"""Batches: POST /batches samples (and optionally attributes) many seeds; GET its progress."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, BackgroundTasks, HTTPException
from sqlalchemy import func, select

from app import jobs
from app.deps import CeleryDep, LimitedOperatorDep, OperatorDep, SessionDep, SettingsDep, WriterDep
from app.orm import Attribution, Batch, Job
from app.routes.common import ERRORS, IdempotencyKey, PathId, check_limit
from app.routes.lookups import (
    attributions_for,
    check_attribute_limits,
    generations_for,
    key_in_use,
    ranking_score,
    replay,
    sampling_steps,
    serving_ensemble,
    verified_top_k,
)
from app.schemas import AttributeOptions, BatchAccepted, BatchCreate, BatchPublic
from app.settings import Settings
from app.writer import Tx

router = APIRouter(tags=["batches"], responses=ERRORS)


@router.post("/batches", status_code=202, response_model=BatchAccepted,
             summary="Many seeds at once, optionally attributed")
async def create_batch(body: BatchCreate, _: LimitedOperatorDep, writer: WriterDep, celery: CeleryDep,
                       settings: SettingsDep, background: BackgroundTasks,
                       idempotency_key: IdempotencyKey = None) -> BatchAccepted:
    """Samples every seed (and attributes each sample when `attribute` is given); follow
    `GET /batches/{batch_id}` for progress over the whole batch."""
    check_limit("max_batch_seeds", body.num_seeds(), settings, "number of seeds")
    if body.steps is not None:  # before any replay by Idempotency-Key, like every limit
        check_limit("max_steps", body.steps, settings, "steps")
    if body.attribute is not None:
        check_attribute_limits(body.attribute, settings)
    seeds = body.seed_list()
    out, new_jobs = await writer.run(lambda tx: _create_batch(tx, body, seeds, settings, idempotency_key))
    # Publishing thousands of ids takes a while: after the response (the jobs are safe in the
    # database; should this process die first, the reaper re-sends them).
    if new_jobs:
        background.add_task(jobs.enqueue, celery, new_jobs)
    return out


def _create_batch(tx: Tx, body: BatchCreate, seeds: list[int], settings: Settings,
                  idempotency_key: str | None) -> tuple[BatchAccepted, list[str]]:
    """The batch, and the ids of the jobs it created (none when replayed)."""
    s = tx.s
    old = replay(s, idempotency_key, "batch")
    if old is not None and old.batch_id is not None:
        ids = list(s.scalars(select(Job.id).where(Job.batch_id == old.batch_id)))
        b = s.get(Batch, old.batch_id)
        assert b is not None
        return BatchAccepted(batch_id=b.id, total=b.total, job_ids=ids), []
    ens = serving_ensemble(tx, body.ensemble_id, settings)
    steps = sampling_steps(body.steps, ens, settings)
    options = body.attribute
    if options is not None:  # stored with the service's defaults filled in, so that they stay its own
        options = options.model_copy(update={"score": ranking_score(options, settings),
                                             "verify_top_k": verified_top_k(options, settings)})
    batch = Batch(ensemble_id=ens.id, steps=steps, total=len(seeds),
                  attribute=options.model_dump() if options else None)
    s.add(batch)
    s.flush()
    gens = generations_for(s, ens.id, seeds, steps)
    batch.generation_ids = [g.id for g in gens]
    new_jobs: list[str] = []
    key = idempotency_key  # carried by the batch's first job
    with key_in_use(idempotency_key):
        if options is None:
            pending = [g.id for g in gens if g.status != "done"]
            step = settings.generate_chunk
            for lo in range(0, len(pending), step):
                new_jobs.append(jobs.new_job(s, "generate", {"generation_ids": pending[lo : lo + step]},
                                             batch_id=batch.id, idempotency_key=None if new_jobs else key))
        else:
            for att, needs in attributions_for(s, gens, options, settings):
                if needs:  # an attribute job samples its generation itself when needed
                    att.job_id = jobs.new_job(s, "attribute", {"attribution_id": att.id}, batch_id=batch.id,
                                              idempotency_key=None if new_jobs else key)
                    new_jobs.append(att.job_id)
    return BatchAccepted(batch_id=batch.id, total=len(seeds), job_ids=new_jobs), new_jobs


@router.get("/batches/{batch_id}", response_model=BatchPublic, summary="Progress over a whole batch")
def get_batch(batch_id: PathId, _: OperatorDep, s: SessionDep, settings: SettingsDep) -> BatchPublic:
    b = s.get(Batch, batch_id)
    if b is None:
        raise HTTPException(404, f"batch {batch_id} not found")
    rows = s.execute(select(Job.status, func.count().label("jobs"), func.sum(Job.progress).label("progress"))
                     .where(Job.batch_id == b.id).group_by(Job.status)).all()
    counts = Counter({row.status: int(row.jobs) for row in rows})
    njobs = sum(counts.values())
    # Finished jobs count fully, the others by their own progress.
    done_jobs = counts["succeeded"] + counts["failed"]
    running = sum(float(row.progress or 0) for row in rows if row.status in ("queued", "running"))
    progress = (done_jobs + running) / njobs if njobs else 1.0
    gen_ids = [int(i) for i in b.generation_ids]
    att_ids: list[int] = []
    if b.attribute:
        # a batch stored before scores were chosen was ranked by influence
        options = AttributeOptions.model_validate({"score": "influence", **b.attribute})
        by_gen = dict(s.execute(select(Attribution.generation_id, Attribution.id).where(
            Attribution.generation_id.in_(gen_ids), Attribution.method == options.method,
            Attribution.metric == options.metric, Attribution.top_k == options.top_k,
            Attribution.verify_top_k == verified_top_k(options, settings),
            Attribution.score == ranking_score(options, settings))).all())
        att_ids = [by_gen[g] for g in gen_ids if g in by_gen]
    return BatchPublic(id=b.id, ensemble_id=b.ensemble_id, steps=b.steps, total=b.total,
                       attribute=b.attribute,
                       jobs=dict(counts), progress=round(progress, 4), done=done_jobs == njobs,
                       generation_ids=gen_ids, attribution_ids=att_ids, created_at=b.created_at)
