"""Lookups and get-or-create steps that several routers share, each raising the HTTP error the
client should see (404 / 409 / 422). They run inside a writer transaction (``Tx``) or a session."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from fastapi import HTTPException
from sqlalchemy import Row, Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import dialect_insert, insert_ignore
from app.orm import (
    Attribution,
    AttributionEntry,
    EnsembleRow,
    Generation,
    Image,
    Job,
    SourceCode,
    utcnow,
)
from app.pictures import predicted_counterfactual, to_png
from app.routes.common import check_limit
from app.schemas import AttributeOptions
from app.settings import Settings
from app.unlearning import head_of, retrain_in_progress
from app.writer import Tx
from models.scores import default_score

CHUNK = 500
"""Rows per statement when reading or writing many (keeps IN lists and VALUES bounded)."""


def ensemble_for(tx: Tx, ensemble_id: int | None) -> EnsembleRow:
    """The ensemble asked for (404 if absent, 409 if not ready), or the serving version of the newest
    registered one. A version superseded (by an opt-out or a retrain) stands for the version of its
    lineage that serves now."""
    s = tx.s
    if ensemble_id is None:
        row = tx.memo.get("default ensemble")
        if row is None:
            row = tx.memo["default ensemble"] = s.scalar(
                select(EnsembleRow).where(EnsembleRow.status == "ready")
                .order_by(EnsembleRow.lineage_id.desc(), EnsembleRow.id.desc()))
        if row is None:
            raise HTTPException(404, "no ready ensemble: train and register one (attrib register)")
        return row
    row = s.get(EnsembleRow, ensemble_id)
    if row is None:
        raise HTTPException(404, f"ensemble {ensemble_id} not found")
    if row.status == "superseded" and row.lineage_id is not None:
        row = head_of(s, row.lineage_id) or row
    if row.status != "ready":
        raise HTTPException(409, f"ensemble {ensemble_id} is {row.status}, not ready")
    return row


def serving_ensemble(tx: Tx, ensemble_id: int | None, settings: Settings) -> EnsembleRow:
    """``ensemble_for``, refusing (409, naming the retrain) a version that opt-outs left with fewer
    served members than ``min_served_fraction`` of n: better no sample than a silently degraded one."""
    row = ensemble_for(tx, ensemble_id)
    served = bin(row.served_members).count("1")
    least = math.ceil(settings.min_served_fraction * row.n)
    if served < max(1, least):
        job = retrain_in_progress(tx.s, row)
        raise HTTPException(409, f"ensemble {row.id} serves {served} of its {row.n} members after opt-outs, "
                            f"fewer than min_served_fraction={settings.min_served_fraction:g} allows; "
                            + (f"retrain job {job} is restoring it (GET /jobs/{job})" if job else
                               "no retrain is running: run 'attrib retrain'"))
    return row


def sampling_steps(requested: int | None, ens: EnsembleRow, settings: Settings) -> int:
    """The steps to sample with: the ensemble's T (capped by max_steps) unless asked; past the
    limit a 422, past the ensemble's T a 409."""
    steps = requested or min(ens.T, settings.max_steps)
    check_limit("max_steps", steps, settings, "steps")
    if steps > ens.T:
        raise HTTPException(409, f"steps {steps} is more than ensemble {ens.id}'s T={ens.T}")
    return steps


def replay(s: Session, idempotency_key: str | None, kind: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created: ``kind`` is a job kind, or
    "batch" for POST /batches (whose first job carries the batch's key). 409 if the key was
    used for another kind of request."""
    if idempotency_key is None:
        return None
    job = s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
    if job is None:
        return None
    used_for = "batch" if job.batch_id is not None else job.kind
    if used_for != kind:
        raise HTTPException(409, f"Idempotency-Key {idempotency_key!r} was used for a {used_for} request")
    return job


def check_attribute_limits(options: AttributeOptions, settings: Settings) -> None:
    """Before any replay by Idempotency-Key: a request past a limit is a 422 every time."""
    check_limit("max_top_k", options.top_k, settings, "top_k")
    if options.verify_top_k is not None:
        check_limit("max_verify_top_k", options.verify_top_k, settings, "verify_top_k")
    if options.score == "resemblance" and options.metric != "l2":
        raise HTTPException(422, "score 'resemblance' is measured in pixel L2: use metric 'l2' (or score "
                            "'influence' with metric 'lpips')")


@contextmanager
def key_in_use(idempotency_key: str | None) -> Iterator[None]:
    """Around the insert of a job: its key taken meanwhile (by another process) is a 409."""
    try:
        yield
    except IntegrityError as exc:
        if idempotency_key is not None:
            raise HTTPException(409, f"a request with Idempotency-Key {idempotency_key!r} is being "
                                "processed; retry to get its result") from exc
        raise


def verified_top_k(options: AttributeOptions, settings: Settings) -> int:
    """How many of the synthetic top are re-ranked exactly: the request's, else the service's default;
    exact rankings are exact already (0)."""
    if options.method == "exact":
        return 0
    if options.verify_top_k is None:
        return min(settings.default_verify_top_k, settings.max_verify_top_k)
    return options.verify_top_k


def ranking_score(options: AttributeOptions, settings: Settings) -> str:
    """What ranks: the request's score, else the service's default (influence for metric lpips)."""
    if options.score is not None:
        return options.score
    return settings.default_score if options.metric == "l2" else default_score("item", options.metric)


_GENERATION_REF = (Generation.id, Generation.seed, Generation.status)
_NEW_GENERATIONS = {dialect: dialect_insert(dialect)(cast(Table, Generation.__table__))
                    .on_conflict_do_nothing().returning(*_GENERATION_REF)
                    for dialect in ("postgresql", "sqlite")}


def generations_for(s: Session, ensemble_id: int, seeds: list[int], steps: int) -> list[Row[Any]]:
    """Get or create one generation per seed (a sample is determined by ensemble, seed, steps):
    its (id, seed, status), in the order of ``seeds``. New ones come back from the INSERT itself;
    only those that existed are read apart."""
    c, now = s.connection(), utcnow()
    have: dict[int, Any] = {}  # seed -> Row (id, seed, status)
    distinct = list(dict.fromkeys(seeds))
    for lo in range(0, len(distinct), CHUNK):
        new = [dict(ensemble_id=ensemble_id, seed=seed, steps=steps, status="pending", created_at=now)
               for seed in distinct[lo : lo + CHUNK]]
        have.update((r.seed, r) for r in c.execute(_NEW_GENERATIONS[c.dialect.name], new))
    existing = [seed for seed in seeds if seed not in have]
    for lo in range(0, len(existing), CHUNK):
        have.update((r.seed, r) for r in c.execute(select(*_GENERATION_REF).where(
            Generation.ensemble_id == ensemble_id, Generation.steps == steps,
            Generation.seed.in_(existing[lo : lo + CHUNK]))))
    return [have[seed] for seed in seeds]


def attributions_for(s: Session, gens: Sequence[Row[Any] | Generation], options: AttributeOptions,
                     settings: Settings) -> list[tuple[Attribution, bool]]:
    """Get or create one attribution per generation with these options; (row, needs a job).

    A failed attribution asked for again is reset (a retry); one pending or running keeps its job."""
    check_attribute_limits(options, settings)
    key = dict(method=options.method, metric=options.metric, top_k=options.top_k,
               verify_top_k=verified_top_k(options, settings), score=ranking_score(options, settings))
    gen_ids = [g.id for g in gens]

    def load() -> dict[int, Attribution]:
        return {a.generation_id: a for lo in range(0, len(gen_ids), CHUNK) for a in s.scalars(
            select(Attribution).filter_by(**key)
            .where(Attribution.generation_id.in_(gen_ids[lo : lo + CHUNK])))}

    have = load()
    missing = [gid for gid in gen_ids if gid not in have]
    if missing:
        now = utcnow()
        insert_ignore(s, Attribution, [dict(generation_id=gid, status="pending", created_at=now, **key)
                                       for gid in missing], CHUNK)
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


def counterfactual_png(s: Session, attribution_id: int, item_id: int) -> bytes:
    """The exact counterfactual's PNG where one was computed, else f + J dw rendered."""
    entry = s.execute(
        select(AttributionEntry.counterfactual_sha, Attribution.generation_id)
        .join(Attribution, Attribution.id == AttributionEntry.attribution_id)
        .where(AttributionEntry.attribution_id == attribution_id,
               AttributionEntry.training_item_id == item_id)
    ).first()
    if entry is None:
        raise HTTPException(404, f"training item {item_id} is not ranked in attribution {attribution_id}")
    if entry.counterfactual_sha is not None:
        img = s.get(Image, entry.counterfactual_sha)
        assert img is not None
        return img.png
    gen = s.get(Generation, entry.generation_id)
    assert gen is not None
    ens = s.get(EnsembleRow, gen.ensemble_id)
    code = s.scalar(select(SourceCode.code).where(SourceCode.ensemble_id == gen.ensemble_id,
                                                  SourceCode.training_item_id == item_id))
    if ens is None or code is None or gen.sample is None or gen.jacobian is None:
        raise HTTPException(404, "no counterfactual stored for this entry")
    c, h, w = ens.config["shape"]
    return to_png(predicted_counterfactual(gen.sample, gen.jacobian, (c, h, w), int(code), ens.n, ens.k,
                                           ens.served_members))
