"""Attributions: POST /attribute ranks a generation's training works (a job); GET the ranking
and each entry's counterfactual."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.db import Database
from app.deps import (
    BodyCache,
    LimitedOperatorDep,
    OperatorDep,
    SessionDep,
    SettingsDep,
    Withdrawals,
    WriterDep,
)
from app.orm import Attribution, AttributionEntry, Generation, OptOut, Owner, TrainingItem
from app.routes.common import ERRORS, PNG, IdempotencyKey, PathId, Scale, png_response
from app.routes.lookups import (
    attributions_for,
    check_attribute_limits,
    counterfactual_png,
    key_in_use,
    replay,
)
from app.schemas import (
    AttributeAccepted,
    AttributeCreate,
    AttributionPublic,
    CausalPublic,
    EntryPublic,
    NearCopyPublic,
    SignificancePublic,
)
from app.settings import Settings
from app.writer import Tx

router = APIRouter(tags=["attributions"], responses=ERRORS)


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
    old = replay(s, idempotency_key, "attribute")
    if old is not None:
        return AttributeAccepted(job_id=old.id, attribution_id=int(old.payload["attribution_id"]))
    gen = s.get(Generation, body.generation_id)
    if gen is None:
        raise HTTPException(404, f"generation {body.generation_id} not found")
    [(att, needs_job)] = attributions_for(s, [gen], body, settings)
    if not needs_job and att.job_id is not None:
        return AttributeAccepted(job_id=att.job_id, attribution_id=att.id)
    with key_in_use(idempotency_key):
        att.job_id = jobs.new_job(s, "attribute", {"attribution_id": att.id}, idempotency_key=idempotency_key)
    tx.publish.append(att.job_id)
    return AttributeAccepted(job_id=att.job_id, attribution_id=att.id)


def attribution_public(s: Session, att: Attribution) -> AttributionPublic:
    rows = s.execute(
        select(AttributionEntry.rank, AttributionEntry.training_item_id, AttributionEntry.score,
               AttributionEntry.exact_score, AttributionEntry.influence, AttributionEntry.exact_influence,
               AttributionEntry.resemblance, AttributionEntry.exact_resemblance, AttributionEntry.p_value,
               AttributionEntry.exact_p_value, AttributionEntry.significant,
               AttributionEntry.counterfactual_sha, TrainingItem.external_ref,
               TrainingItem.label, TrainingItem.owner_id, Owner.name.label("owner_name"),
               OptOut.created_at.label("withdrawn_at"))
        .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
        .outerjoin(Owner, Owner.id == TrainingItem.owner_id)
        .outerjoin(OptOut, OptOut.training_item_id == AttributionEntry.training_item_id)
        .where(AttributionEntry.attribution_id == att.id)
        .order_by(AttributionEntry.rank)
    ).all()
    entries = [EntryPublic(rank=r.rank, training_item_id=r.training_item_id, score=r.score,
                           exact_score=r.exact_score, influence=r.influence,
                           exact_influence=r.exact_influence,
                           resemblance=r.resemblance, exact_resemblance=r.exact_resemblance,
                           p_value=r.p_value, exact_p_value=r.exact_p_value, significant=r.significant,
                           counterfactual_url=f"/attributions/{att.id}/counterfactual/{r.training_item_id}.png",
                           counterfactual_kind="exact" if r.counterfactual_sha else "predicted",
                           external_ref=r.external_ref, label=r.label, owner_id=r.owner_id,
                           owner_name=r.owner_name, withdrawn_at=r.withdrawn_at) for r in rows]
    return AttributionPublic(id=att.id, generation_id=att.generation_id, method=att.method, metric=att.metric,
                             score=att.score, top_k=att.top_k, verify_top_k=att.verify_top_k,  # type: ignore[arg-type]
                             status=att.status,  # type: ignore[arg-type]
                             attributable=att.attributable,
                             significance=SignificancePublic.model_validate(att.significance)
                             if att.significance else None,
                             near_copy=NearCopyPublic.model_validate(att.near_copy)
                             if att.near_copy else None,
                             causal=CausalPublic.model_validate(att.causal) if att.causal else None,
                             agreement=None if att.agreement is None else {  # null stored: undefined
                                 k: float("nan") if v is None else v for k, v in att.agreement.items()},
                             created_at=att.created_at, finished_at=att.finished_at,
                             entries=entries)


@router.get("/attributions/{attribution_id}", response_model=AttributionPublic,
            summary="A ranking of training works, with owners and exact scores where verified")
async def get_attribution(attribution_id: PathId, _: OperatorDep, request: Request) -> Response:
    """A finished ranking never changes, so its JSON is kept (per process) after the first read;
    only a withdrawal marks its entries (`withdrawn_at`), within `influence_cache_s`."""
    st = request.app.state
    withdrawals: Withdrawals = st.withdrawals
    count = withdrawals.fresh()
    if count is None:
        count = await st.reads.run(withdrawals.read, st.db)
    cache: BodyCache = st.ranking_cache
    body = cache.get((attribution_id, count))
    if body is None:
        body, final = await st.reads.run(_ranking_json, st.db, attribution_id)
        if final:
            cache.put((attribution_id, count), body)
    return Response(body, media_type="application/json")


def _ranking_json(db: Database, attribution_id: int) -> tuple[bytes, bool]:
    with db.session() as s:
        att = s.get(Attribution, attribution_id)
        if att is None:
            raise HTTPException(404, f"attribution {attribution_id} not found")
        return attribution_public(s, att).model_dump_json().encode(), att.status == "succeeded"


@router.get("/attributions/{attribution_id}/counterfactual/{item_id}.png", responses=PNG,
            response_class=Response, summary="The generation without one training work")
def get_counterfactual(attribution_id: PathId, item_id: PathId, _: OperatorDep, s: SessionDep,
                       scale: Scale = 1) -> Response:
    """The exact counterfactual (same noise, the members trained on the work dropped) where
    verified, otherwise the one synthetic ablation predicts (first order)."""
    return png_response(counterfactual_png(s, attribution_id, item_id), scale)
