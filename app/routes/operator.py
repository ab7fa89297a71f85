"""Operator routes: generate, attribute, jobs, generations, attributions, batches.

Handlers only validate, write rows and publish job ids; workers do the computing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, cast

from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Path, Query, Request, Response
from sqlalchemy import Row, Table, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jobs
from app.db import Database
from app.deps import BodyCache, CeleryDep, LimitedOperatorDep, OperatorDep, SessionDep, SettingsDep, WriterDep
from app.orm import (
    Attribution,
    AttributionEntry,
    Batch,
    EnsembleRow,
    Generation,
    Image,
    Job,
    Owner,
    SourceCode,
    TrainingItem,
    utcnow,
)
from app.pictures import MAX_SCALE, predicted_counterfactual, rescale_png, to_png
from app.schemas import (
    AttributeAccepted,
    AttributeCreate,
    AttributeOptions,
    AttributionPublic,
    BatchAccepted,
    BatchCreate,
    BatchPublic,
    EntryPublic,
    ErrorPublic,
    GenerateAccepted,
    GenerateCreate,
    GenerationPublic,
    JobPublic,
)
from app.settings import Settings
from app.writer import Tx

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "missing, invalid or revoked API key"},
    403: {"model": ErrorPublic, "description": "a rights holder's key on an operator route"},
    404: {"model": ErrorPublic, "description": "no such object"},
    409: {"model": ErrorPublic, "description": "conflicts with the current state (an ensemble not ready, "
          "steps past its T, an Idempotency-Key in use)"},
    413: {"model": ErrorPublic, "description": "body larger than max_body_bytes"},
    422: {"model": ErrorPublic, "description": "invalid request, or past a limit (named in the message)"},
    429: {"model": ErrorPublic, "description": "rate limit of the key exceeded (POST routes): Retry-After"},
    503: {"model": ErrorPublic, "description": "the database is unavailable"},
}
PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}
IdempotencyKey = Annotated[str | None, Header(max_length=200, description=(
    "optional: a retried request with the same key returns the first request's job"))]
MAX_ID = 2**31 - 1  # integer primary keys (PostgreSQL int4)
PathId = Annotated[int, Path(ge=1, le=MAX_ID, description="an id")]
JobId = Annotated[str, Path(max_length=36, description="a job id (UUID)")]
Scale = Annotated[int, Query(ge=1, le=MAX_SCALE, description="integer upscaling (nearest neighbour)")]

router = APIRouter(tags=["operator"], responses=ERRORS)


def limit(name: str, value: int, settings: Settings, what: str) -> None:
    cap = int(getattr(settings, name))
    if value > cap:
        raise HTTPException(422, f"{what} {value} is over the limit {name}={cap}")


def png_response(png: bytes, scale: int = 1) -> Response:
    return Response(rescale_png(png, scale), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})


def _ensemble(tx: Tx, ensemble_id: int | None) -> EnsembleRow:
    s = tx.s
    if ensemble_id is None:
        row = tx.memo.get("default ensemble")
        if row is None:
            row = tx.memo["default ensemble"] = s.scalar(
                select(EnsembleRow).where(EnsembleRow.status == "ready").order_by(EnsembleRow.id.desc()))
        if row is None:
            raise HTTPException(404, "no ready ensemble: train and register one (attrib service register)")
        return row
    row = s.get(EnsembleRow, ensemble_id)
    if row is None:
        raise HTTPException(404, f"ensemble {ensemble_id} not found")
    if row.status != "ready":
        raise HTTPException(409, f"ensemble {ensemble_id} is {row.status}, not ready")
    return row


def _steps(requested: int | None, ens: EnsembleRow, settings: Settings) -> int:
    steps = requested or min(ens.T, settings.max_steps)
    limit("max_steps", steps, settings, "steps")
    if steps > ens.T:
        raise HTTPException(409, f"steps {steps} is more than ensemble {ens.id}'s T={ens.T}")
    return steps


def _chunks(xs: list[Any], size: int = 500) -> list[list[Any]]:
    return [xs[i : i + size] for i in range(0, len(xs), size)]


def _insert(s: Session) -> Any:
    return pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert


def _insert_ignore(s: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING (rows created concurrently are simply kept)."""
    insert = _insert(s)
    for part in _chunks(rows):
        s.execute(insert(table).values(part).on_conflict_do_nothing())


_GENERATION_REF = (Generation.id, Generation.seed, Generation.status)
_NEW_GENERATIONS = {name: ins(cast(Table, Generation.__table__)).on_conflict_do_nothing()
                    .returning(*_GENERATION_REF)
                    for name, ins in (("postgresql", pg_insert), ("sqlite", sqlite_insert))}


def _generations(s: Session, ensemble_id: int, seeds: list[int], steps: int) -> list[Row[Any]]:
    """Get or create one generation per seed (a sample is determined by ensemble, seed, steps):
    its (id, seed, status), in the order of ``seeds``. New ones come back from the INSERT itself;
    only those that existed are read apart."""
    c, now = s.connection(), utcnow()
    have: dict[int, Any] = {}  # seed -> Row (id, seed, status)
    for part in _chunks(list(dict.fromkeys(seeds))):
        new = [dict(ensemble_id=ensemble_id, seed=sd, steps=steps, status="pending", created_at=now)
               for sd in part]
        have.update((r.seed, r) for r in c.execute(_NEW_GENERATIONS[c.dialect.name], new))
    for part in _chunks([sd for sd in seeds if sd not in have]):
        have.update((r.seed, r) for r in c.execute(select(*_GENERATION_REF).where(
            Generation.ensemble_id == ensemble_id, Generation.steps == steps, Generation.seed.in_(part))))
    return [have[sd] for sd in seeds]


def _attributions(s: Session, gens: list[Row[Any]] | list[Generation], opt: AttributeOptions,
                  settings: Settings) -> list[tuple[Attribution, bool]]:
    """Get or create one attribution per generation with these options; (row, needs a job).

    A failed attribution asked for again is reset (a retry); one pending or running keeps its job."""
    check_attribute_limits(opt, settings)
    # Exact entries are exact already; verifying more than the reported top_k means all of them.
    verify_k = 0 if opt.method == "exact" else min(opt.verify_top_k, opt.top_k)
    key = dict(method=opt.method, metric=opt.metric, top_k=opt.top_k, verify_top_k=verify_k)
    gen_ids = [g.id for g in gens]

    def load() -> dict[int, Attribution]:
        return {a.generation_id: a for part in _chunks(gen_ids) for a in s.scalars(
            select(Attribution).filter_by(**key).where(Attribution.generation_id.in_(part)))}

    have = load()
    missing = [gid for gid in gen_ids if gid not in have]
    if missing:
        now = utcnow()
        _insert_ignore(s, Attribution, [dict(generation_id=gid, status="pending", created_at=now, **key)
                                        for gid in missing])
        have = load()
    out = []
    for gid in gen_ids:
        att = have[gid]
        if att.status == "failed":
            att.status = "pending"
            out.append((att, True))
        else:
            out.append((att, att.job_id is None))
    return out


def _replay(s: Session, key: str | None, kind: str) -> Job | None:
    """The job of an earlier request with this Idempotency-Key (409 if that was another kind of
    request: a batch's first job carries the batch's key, but it is no POST /generate's job)."""
    if key is None:
        return None
    job = s.scalar(select(Job).where(Job.idempotency_key == key))
    if job is None:
        return None
    used_for = "batch" if job.batch_id is not None else job.kind
    if used_for != kind:
        raise HTTPException(409, f"Idempotency-Key {key!r} was used for a {used_for} request")
    return job


def check_attribute_limits(opt: AttributeOptions, settings: Settings) -> None:
    """Before any replay by Idempotency-Key: a request past a limit is a 422 every time."""
    limit("max_top_k", opt.top_k, settings, "top_k")
    limit("max_verify_top_k", opt.verify_top_k, settings, "verify_top_k")


@router.post("/generate", status_code=202, response_model=GenerateAccepted,
             summary="Sample images (asynchronously)")
async def generate(body: GenerateCreate, _: LimitedOperatorDep, writer: WriterDep, settings: SettingsDep,
                   idempotency_key: IdempotencyKey = None) -> GenerateAccepted:
    """Creates one generation per seed and a job that samples them. Poll `GET /jobs/{job_id}`;
    the same (ensemble, seed, steps) always gives the same generation and the same bytes."""
    limit("max_seeds_per_request", body.num_seeds(), settings, "number of seeds")
    if body.steps is not None:  # before any replay by Idempotency-Key, like every limit
        limit("max_steps", body.steps, settings, "steps")
    seeds = body.seed_list()
    return await writer.run(lambda tx: _generate(tx, body, seeds, settings, idempotency_key))


def _generate(tx: Tx, body: GenerateCreate, seeds: list[int], settings: Settings,
              idempotency_key: str | None) -> GenerateAccepted:
    s = tx.s
    old = _replay(s, idempotency_key, "generate")
    if old is not None:
        return GenerateAccepted(job_id=old.id, **old.payload["response"])
    ens = _ensemble(tx, body.ensemble_id)
    steps = _steps(body.steps, ens, settings)
    gens = _generations(s, ens.id, seeds, steps)
    ids = [g.id for g in gens]
    resp = {"generation_ids": ids, "ensemble_id": ens.id, "steps": steps}
    pending = any(g.status != "done" for g in gens)
    # Everything already sampled: a job that has succeeded, nothing to queue.
    done = None if pending else {"generation_ids": ids, "sampled": 0}
    with _key_in_use(idempotency_key):
        job_id = jobs.new_job(s, "generate", {"generation_ids": ids, "response": resp},
                              idempotency_key=idempotency_key, done=done)
    if pending:
        tx.publish.append(job_id)
    return GenerateAccepted(job_id=job_id, **resp)


@contextmanager
def _key_in_use(idempotency_key: str | None) -> Iterator[None]:
    """Around the insert of a job: its key taken meanwhile (by another process) is a 409."""
    try:
        yield
    except IntegrityError as exc:
        if idempotency_key is not None:
            raise HTTPException(409, f"a request with Idempotency-Key {idempotency_key!r} is being "
                                "processed; retry to get its result") from exc
        raise


@router.post("/attribute", status_code=202, response_model=AttributeAccepted,
             summary="Attribute a generation to its training works (asynchronously)")
async def attribute(body: AttributeCreate, _: LimitedOperatorDep, writer: WriterDep, settings: SettingsDep,
                    idempotency_key: IdempotencyKey = None) -> AttributeAccepted:
    """Ranks every training work by how much removing it would change the generation. The same
    request twice returns the same attribution (and its job, while it runs)."""
    check_attribute_limits(body, settings)
    return await writer.run(lambda tx: _attribute(tx, body, settings, idempotency_key))


def _attribute(tx: Tx, body: AttributeCreate, settings: Settings,
               idempotency_key: str | None) -> AttributeAccepted:
    s = tx.s
    old = _replay(s, idempotency_key, "attribute")
    if old is not None:
        return AttributeAccepted(job_id=old.id, attribution_id=int(old.payload["attribution_id"]))
    gen = s.get(Generation, body.generation_id)
    if gen is None:
        raise HTTPException(404, f"generation {body.generation_id} not found")
    [(att, needs_job)] = _attributions(s, [gen], body, settings)
    if not needs_job and att.job_id is not None:
        return AttributeAccepted(job_id=att.job_id, attribution_id=att.id)
    with _key_in_use(idempotency_key):
        att.job_id = jobs.new_job(s, "attribute", {"attribution_id": att.id}, idempotency_key=idempotency_key)
    tx.publish.append(att.job_id)
    return AttributeAccepted(job_id=att.job_id, attribution_id=att.id)


@router.get("/jobs/{job_id}", response_model=JobPublic, summary="Status and progress of a job")
def get_job(job_id: JobId, _: OperatorDep, s: SessionDep) -> JobPublic:
    job = s.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return JobPublic.model_validate(job, from_attributes=True)


def _generation_public(g: Generation) -> GenerationPublic:
    return GenerationPublic(
        id=g.id, ensemble_id=g.ensemble_id, seed=g.seed, steps=g.steps, status=g.status,  # type: ignore[arg-type]
        image_url=f"/generations/{g.id}/image.png" if g.image_sha else None, image_sha256=g.image_sha,
        has_jacobian=g.jacobian is not None, created_at=g.created_at, finished_at=g.finished_at)


@router.get("/generations/{generation_id}", response_model=GenerationPublic, summary="A generation")
def get_generation(generation_id: PathId, _: OperatorDep, s: SessionDep) -> GenerationPublic:
    g = s.get(Generation, generation_id)
    if g is None:
        raise HTTPException(404, f"generation {generation_id} not found")
    return _generation_public(g)


@router.get("/generations/{generation_id}/image.png", responses=PNG, response_class=Response,
            summary="A generation's PNG")
def get_generation_image(generation_id: PathId, _: OperatorDep, s: SessionDep, scale: Scale = 1) -> Response:
    g = s.get(Generation, generation_id)
    if g is None:
        raise HTTPException(404, f"generation {generation_id} not found")
    if g.image_sha is None:
        raise HTTPException(404, f"generation {generation_id} is not sampled yet")
    img = s.get(Image, g.image_sha)
    assert img is not None
    return png_response(img.png, scale)


def attribution_public(s: Session, att: Attribution) -> AttributionPublic:
    rows = s.execute(
        select(AttributionEntry.rank, AttributionEntry.training_item_id, AttributionEntry.score,
               AttributionEntry.exact_score, AttributionEntry.counterfactual_sha, TrainingItem.external_ref,
               TrainingItem.label, TrainingItem.owner_id, Owner.name)
        .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
        .outerjoin(Owner, Owner.id == TrainingItem.owner_id)
        .where(AttributionEntry.attribution_id == att.id)
        .order_by(AttributionEntry.rank)
    ).all()
    entries = [EntryPublic(rank=r[0], training_item_id=r[1], score=r[2], exact_score=r[3],
                           counterfactual_url=f"/attributions/{att.id}/counterfactual/{r[1]}.png",
                           counterfactual_kind="exact" if r[4] else "predicted",
                           external_ref=r[5], label=r[6], owner_id=r[7], owner_name=r[8]) for r in rows]
    return AttributionPublic(id=att.id, generation_id=att.generation_id, method=att.method, metric=att.metric,
                             top_k=att.top_k, verify_top_k=att.verify_top_k, status=att.status,  # type: ignore[arg-type]
                             agreement=att.agreement, created_at=att.created_at, finished_at=att.finished_at,
                             entries=entries)


@router.get("/attributions/{attribution_id}", response_model=AttributionPublic,
            summary="A ranking of training works, with owners and exact scores where verified")
async def get_attribution(attribution_id: PathId, _: OperatorDep, request: Request) -> Response:
    """A finished ranking never changes, so its JSON is kept (per process) after the first read."""
    cache: BodyCache = request.app.state.ranking_cache
    body = cache.get(attribution_id)
    if body is None:
        body, final = await request.app.state.reads.run(_ranking_json, request.app.state.db, attribution_id)
        if final:
            cache.put(attribution_id, body)
    return Response(body, media_type="application/json")


def _ranking_json(db: Database, attribution_id: int) -> tuple[bytes, bool]:
    with db.session() as s:
        att = s.get(Attribution, attribution_id)
        if att is None:
            raise HTTPException(404, f"attribution {attribution_id} not found")
        return attribution_public(s, att).model_dump_json().encode(), att.status == "succeeded"


def counterfactual_png(s: Session, attribution_id: int, item_id: int) -> bytes:
    """The exact counterfactual's PNG where one was computed, else f + J dw rendered."""
    row = s.execute(
        select(AttributionEntry.counterfactual_sha, Attribution.generation_id)
        .join(Attribution, Attribution.id == AttributionEntry.attribution_id)
        .where(AttributionEntry.attribution_id == attribution_id,
               AttributionEntry.training_item_id == item_id)
    ).first()
    if row is None:
        raise HTTPException(404, f"training item {item_id} is not ranked in attribution {attribution_id}")
    if row[0] is not None:
        img = s.get(Image, row[0])
        assert img is not None
        return img.png
    gen = s.get(Generation, row[1])
    assert gen is not None
    ens = s.get(EnsembleRow, gen.ensemble_id)
    code = s.scalar(select(SourceCode.code).where(SourceCode.ensemble_id == gen.ensemble_id,
                                                  SourceCode.training_item_id == item_id))
    if ens is None or code is None or gen.sample is None or gen.jacobian is None:
        raise HTTPException(404, "no counterfactual stored for this entry")
    c, h, w = ens.config["shape"]
    return to_png(predicted_counterfactual(gen.sample, gen.jacobian, (c, h, w), int(code), ens.n, ens.k))


@router.get("/attributions/{attribution_id}/counterfactual/{item_id}.png", responses=PNG,
            response_class=Response, summary="The generation without one training work")
def get_counterfactual(attribution_id: PathId, item_id: PathId, _: OperatorDep, s: SessionDep,
                       scale: Scale = 1) -> Response:
    """The exact counterfactual (same noise, the members trained on the work dropped) where
    verified, otherwise the one synthetic ablation predicts (first order)."""
    return png_response(counterfactual_png(s, attribution_id, item_id), scale)


@router.post("/batches", status_code=202, response_model=BatchAccepted,
             summary="Many seeds at once, optionally attributed")
async def create_batch(body: BatchCreate, _: LimitedOperatorDep, writer: WriterDep, celery: CeleryDep,
                       settings: SettingsDep, background: BackgroundTasks,
                       idempotency_key: IdempotencyKey = None) -> BatchAccepted:
    """Samples every seed (and attributes each sample when `attribute` is given); follow
    `GET /batches/{batch_id}` for progress over the whole batch."""
    limit("max_batch_seeds", body.num_seeds(), settings, "number of seeds")
    if body.steps is not None:
        limit("max_steps", body.steps, settings, "steps")
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
    old = _replay(s, idempotency_key, "batch")
    if old is not None and old.batch_id is not None:
        ids = list(s.scalars(select(Job.id).where(Job.batch_id == old.batch_id)))
        b = s.get(Batch, old.batch_id)
        assert b is not None
        return BatchAccepted(batch_id=b.id, total=b.total, job_ids=ids), []
    ens = _ensemble(tx, body.ensemble_id)
    steps = _steps(body.steps, ens, settings)
    opt = body.attribute
    batch = Batch(ensemble_id=ens.id, steps=steps, total=len(seeds),
                  attribute=opt.model_dump() if opt else None)
    s.add(batch)
    s.flush()
    gens = _generations(s, ens.id, seeds, steps)
    batch.generation_ids = [g.id for g in gens]
    new_jobs: list[str] = []
    key = idempotency_key  # carried by the batch's first job
    with _key_in_use(idempotency_key):
        if opt is None:
            pending = [g.id for g in gens if g.status != "done"]
            step = settings.generate_chunk
            for lo in range(0, len(pending), step):
                new_jobs.append(jobs.new_job(s, "generate", {"generation_ids": pending[lo : lo + step]},
                                             batch_id=batch.id, idempotency_key=None if new_jobs else key))
        else:
            for att, needs in _attributions(s, gens, opt, settings):
                if needs:  # an attribute job samples its generation itself when needed
                    att.job_id = jobs.new_job(s, "attribute", {"attribution_id": att.id}, batch_id=batch.id,
                                              idempotency_key=None if new_jobs else key)
                    new_jobs.append(att.job_id)
    return BatchAccepted(batch_id=batch.id, total=len(seeds), job_ids=new_jobs), new_jobs


@router.get("/batches/{batch_id}", response_model=BatchPublic, summary="Progress over a whole batch")
def get_batch(batch_id: PathId, _: OperatorDep, s: SessionDep) -> BatchPublic:
    b = s.get(Batch, batch_id)
    if b is None:
        raise HTTPException(404, f"batch {batch_id} not found")
    rows = s.execute(select(Job.status, func.count(), func.sum(Job.progress))
                     .where(Job.batch_id == b.id).group_by(Job.status)).all()
    counts = Counter({st: int(c) for st, c, _ in rows})
    njobs = sum(counts.values())
    # Finished jobs count fully, the others by their own progress.
    done_jobs = counts["succeeded"] + counts["failed"]
    running = sum(float(p or 0) for st, _, p in rows if st in ("queued", "running"))
    prog = (done_jobs + running) / njobs if njobs else 1.0
    gen_ids = [int(i) for i in b.generation_ids]
    att_ids: list[int] = []
    if b.attribute:
        opt = AttributeOptions.model_validate(b.attribute)
        verify_k = 0 if opt.method == "exact" else min(opt.verify_top_k, opt.top_k)
        by_gen = dict(s.execute(select(Attribution.generation_id, Attribution.id).where(
            Attribution.generation_id.in_(gen_ids), Attribution.method == opt.method,
            Attribution.metric == opt.metric, Attribution.top_k == opt.top_k,
            Attribution.verify_top_k == verify_k)).all())
        att_ids = [by_gen[g] for g in gen_ids if g in by_gen]
    return BatchPublic(id=b.id, ensemble_id=b.ensemble_id, steps=b.steps, total=b.total,
                       attribute=b.attribute,
                       jobs=dict(counts), progress=round(prog, 4), done=done_jobs == njobs,
                       generation_ids=gen_ids, attribution_ids=att_ids, created_at=b.created_at)
