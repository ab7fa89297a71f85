"""Rights-holder routes: a holder sees only their own works and where they were influential.

Another owner's work answers 404 (never 403: ids of others' works are not confirmed).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.db import Database
from app.deps import BodyCache, DatabaseDep, OwnerDep, ReadsDep, SessionDep, SettingsDep
from app.orm import Attribution, AttributionEntry, Generation, Image, TrainingItem
from app.routes.common import ERRORS, PNG, Offset, PageSize, PathId, Scale, check_limit, png_response
from app.routes.lookups import counterfactual_png
from app.schemas import InfluencePage, InfluencePublic, WorkPage, WorkPublic
from app.unlearning import opt_outs_public

router = APIRouter(prefix="/works", tags=["rights holder"],
                   responses={k: v for k, v in ERRORS.items() if k != 403} | {
                       403: {"model": ERRORS[403]["model"], "description": "an operator key (use a "
                             "rights holder's key)"}})


def own_work(s: Session, p: Principal, work_id: int) -> TrainingItem:
    item = s.get(TrainingItem, work_id)
    if item is None or item.owner_id != p.owner_id:
        raise HTTPException(404, f"work {work_id} not found")
    return item


def works_public(s: Session, items: list[TrainingItem]) -> list[WorkPublic]:
    opt_outs = opt_outs_public(s, [t.id for t in items])
    return [WorkPublic(id=t.id, dataset_id=t.dataset_id, external_ref=t.external_ref, label=t.label,
                       sha256=t.sha256, image_url=f"/works/{t.id}/image.png", opt_out=opt_outs.get(t.id))
            for t in items]


@router.get("", response_model=WorkPage, summary="Your works")
def list_works(p: OwnerDep, s: SessionDep, settings: SettingsDep, offset: Offset = 0,
               limit_: PageSize = 100) -> WorkPage:
    check_limit("max_page_size", limit_, settings, "limit")
    q = select(TrainingItem).where(TrainingItem.owner_id == p.owner_id)
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    items = s.scalars(q.order_by(TrainingItem.id).offset(offset).limit(limit_))
    return WorkPage(items=works_public(s, list(items)), total=total, offset=offset, limit=limit_)


@router.get("/{work_id}", response_model=WorkPublic, summary="One of your works")
def get_work(work_id: PathId, p: OwnerDep, s: SessionDep) -> WorkPublic:
    """With its opt-out, if you withdrew it (POST /works/{id}/opt-out)."""
    return works_public(s, [own_work(s, p, work_id)])[0]


@router.get("/{work_id}/image.png", responses=PNG, response_class=Response, summary="Your work's image")
def get_work_image(work_id: PathId, p: OwnerDep, s: SessionDep, scale: Scale = 1) -> Response:
    img = s.get(Image, own_work(s, p, work_id).image_sha)
    assert img is not None
    return png_response(img.png, scale)


@router.get("/{work_id}/influence", response_model=InfluencePage,
            summary="Generations in which your work ranked in the top k")
async def get_influence(work_id: PathId, p: OwnerDep, db: DatabaseDep, reads: ReadsDep,
                        settings: SettingsDep, request: Request, offset: Offset = 0,
                        limit_: PageSize = 100) -> Response:
    """Newest first: every finished attribution that ranked this work, with its rank, score
    (exact where verified) and links to the generated image and to its counterfactual. A page
    is reused for `influence_cache_s` (1 s by default): a new attribution shows up within it."""
    check_limit("max_page_size", limit_, settings, "limit")
    cache: BodyCache = request.app.state.influence_cache
    key = (p.owner_id, work_id, offset, limit_)
    body = cache.get(key)
    if body is None:
        # The hot read of a rights holder: one trip to the thread pool, one statement, no ORM.
        body = await reads.run(_influence_json, db, p, work_id, offset, limit_)
        cache.put(key, body)
    return Response(body, media_type="application/json")


_INFLUENCE = (
    select(AttributionEntry.rank, AttributionEntry.score, AttributionEntry.exact_score,
           AttributionEntry.p_value,
           Attribution.id.label("attribution_id"), Attribution.top_k, Attribution.method, Attribution.metric,
           Attribution.score.label("score_name"), Attribution.attributable, Attribution.copy_of_item_id,
           Attribution.finished_at, Attribution.created_at,
           Generation.id.label("generation_id"), Generation.ensemble_id, Generation.seed)
    .join(Attribution, Attribution.id == AttributionEntry.attribution_id)
    .join(Generation, Generation.id == Attribution.generation_id)
    .where(AttributionEntry.training_item_id == bindparam("work_id"), Attribution.status == "succeeded")
)
# The page of the caller's own work (the owner is in the join) and the total in one statement.
_INFLUENCE_PAGE = (_INFLUENCE.add_columns(func.count().over().label("total"))
                   .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
                   .where(TrainingItem.owner_id == bindparam("owner_id"))
                   .order_by(Attribution.id.desc()).offset(bindparam("offset")).limit(bindparam("limit")))
_INFLUENCE_TOTAL = select(func.count()).select_from(_INFLUENCE.subquery())
_OWNER_OF = select(TrainingItem.owner_id).where(TrainingItem.id == bindparam("work_id"))


def _influence_json(db: Database, p: Principal, work_id: int, offset: int, limit_: int) -> bytes:
    return influence_page(db, p, work_id, offset, limit_).model_dump_json().encode()  # built and checked once


def influence_page(db: Database, p: Principal, work_id: int, offset: int, limit_: int) -> InfluencePage:
    """A page of the caller's work's influence, newest first (404 for anything not theirs)."""
    if p.owner_id is None:
        raise HTTPException(404, f"work {work_id} not found")
    with db.reads.connect() as c:
        rows = c.execute(_INFLUENCE_PAGE, {"work_id": work_id, "owner_id": p.owner_id, "offset": offset,
                                           "limit": limit_}).all()
        if rows:
            total = rows[0].total
        else:  # another holder's work, none, or past the last page (no row carries the total)
            if c.scalar(_OWNER_OF, {"work_id": work_id}) != p.owner_id:
                raise HTTPException(404, f"work {work_id} not found")
            total = c.scalar(_INFLUENCE_TOTAL, {"work_id": work_id}) if offset else 0
    base = f"/works/{work_id}/influence"
    items = [InfluencePublic(rank=r.rank, score=r.score, exact_score=r.exact_score, score_name=r.score_name,
                             p_value=r.p_value, attributable=r.attributable,
                             near_copy=r.copy_of_item_id == work_id,
                             attribution_id=r.attribution_id, top_k=r.top_k, method=r.method, metric=r.metric,
                             created_at=r.finished_at or r.created_at, generation_id=r.generation_id,
                             ensemble_id=r.ensemble_id, seed=r.seed,
                             generation_url=f"{base}/{r.attribution_id}/generation.png",
                             counterfactual_url=f"{base}/{r.attribution_id}/counterfactual.png")
             for r in rows]
    return InfluencePage(work_id=work_id, items=items, total=total, offset=offset, limit=limit_)


def ranked_attribution(s: Session, p: Principal, work_id: int, attribution_id: int) -> Attribution:
    own_work(s, p, work_id)
    att = s.get(Attribution, attribution_id)
    ranked = att is not None and att.status == "succeeded" and s.scalar(
        select(AttributionEntry.id).where(AttributionEntry.attribution_id == attribution_id,
                                          AttributionEntry.training_item_id == work_id)) is not None
    if not ranked or att is None:
        raise HTTPException(404, f"work {work_id} is not ranked in attribution {attribution_id}")
    return att


@router.get("/{work_id}/influence/{attribution_id}/generation.png", responses=PNG, response_class=Response,
            summary="The generation your work influenced")
def get_influenced_generation(work_id: PathId, attribution_id: PathId, p: OwnerDep, s: SessionDep,
                              scale: Scale = 1) -> Response:
    att = ranked_attribution(s, p, work_id, attribution_id)
    gen = s.get(Generation, att.generation_id)
    if gen is None or gen.image_sha is None:
        raise HTTPException(404, "generation image not found")
    img = s.get(Image, gen.image_sha)
    assert img is not None
    return png_response(img.png, scale)


@router.get("/{work_id}/influence/{attribution_id}/counterfactual.png", responses=PNG,
            response_class=Response, summary="That generation without your work")
def get_influenced_counterfactual(work_id: PathId, attribution_id: PathId, p: OwnerDep, s: SessionDep,
                                  scale: Scale = 1) -> Response:
    ranked_attribution(s, p, work_id, attribution_id)
    return png_response(counterfactual_png(s, attribution_id, work_id), scale)
