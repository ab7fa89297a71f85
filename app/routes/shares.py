"""Shares (app.shares): each owner's share of an attribution (operator), a rights holder's
shares and totals over time (``/me``), and the exact owner-level counterfactual (a job)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs, shares
from app.db import Database
from app.deps import (
    DatabaseDep,
    LimitedOperatorDep,
    OperatorDep,
    OwnerDep,
    ReadsDep,
    SessionDep,
    SettingsDep,
    WriterDep,
)
from app.orm import Attribution, Image, Job
from app.routes.common import ERRORS, PNG, Offset, PageSize, PathId, Scale, check_limit, png_response
from app.schemas import (
    AttributionSharesPublic,
    DayTotalPublic,
    HolderDays,
    HolderSharePage,
    HolderSharePublic,
    OwnerCounterfactualAccepted,
    OwnerSharePublic,
)
from app.writer import Tx

router = APIRouter(tags=["shares"], responses=ERRORS)

MAX_DAYS = 366
Days = Annotated[int, Query(ge=1, le=MAX_DAYS, description="days back from today (UTC), today included")]


def shares_public(s: shares.AttributionShares) -> AttributionSharesPublic:
    return AttributionSharesPublic(
        attribution_id=s.attribution_id, attributable=s.attributable,
        status="attributed" if s.attributable else "unattributed",
        shares=[OwnerSharePublic(owner_id=o.owner_id, owner_name=o.owner_name, share=o.share, works=o.works)
                for o in s.shares])


@router.get("/attributions/{attribution_id}/shares", response_model=AttributionSharesPublic,
            summary="Each owner's share of an attribution")
def get_attribution_shares(attribution_id: PathId, _: OperatorDep,
                           s: SessionDep) -> AttributionSharesPublic:
    """Shares sum to 1 over the owners (works without one are the line with `owner_id` null), or
    the attribution is `unattributed` (no positive score). Definition: README, "Shares"."""
    att = s.get(Attribution, attribution_id)
    if att is None:
        raise HTTPException(404, f"attribution {attribution_id} not found")
    if att.status != "succeeded":
        raise HTTPException(409, f"attribution {attribution_id} is {att.status}: shares exist once it "
                            "succeeded")
    return shares_public(shares.attribution_shares(s, attribution_id))


def counterfactual_key(attribution_id: int, owner_id: int) -> str:
    """The Idempotency-Key of the one job per (attribution, owner)."""
    return f"owner-counterfactual:{attribution_id}:{owner_id}"


def _image_url(attribution_id: int, owner_id: int) -> str:
    return f"/attributions/{attribution_id}/shares/{owner_id}/counterfactual.png"


@router.post("/attributions/{attribution_id}/shares/{owner_id}/counterfactual", status_code=202,
             response_model=OwnerCounterfactualAccepted,
             summary="The generation without any member trained on one owner's works (asynchronously)")
async def create_owner_counterfactual(attribution_id: PathId, owner_id: PathId, _: LimitedOperatorDep,
                                      writer: WriterDep,
                                      settings: SettingsDep) -> OwnerCounterfactualAccepted:
    """Resamples the generation with the same noise, dropping the union of the members trained on
    the owner's works. Refused (409, with the reason) when fewer than
    `owner_counterfactual_min_members` members would remain. Asked again, it answers the same job
    (a failed one is run again)."""
    min_members = settings.owner_counterfactual_min_members
    return await writer.run(lambda tx: _owner_counterfactual(tx, attribution_id, owner_id, min_members))


def _owner_counterfactual(tx: Tx, attribution_id: int, owner_id: int,
                          min_members: int) -> OwnerCounterfactualAccepted:
    s = tx.s
    members = shares.owner_members(s, attribution_id, owner_id, min_members)
    key = counterfactual_key(attribution_id, owner_id)
    job = s.scalar(select(Job).where(Job.idempotency_key == key))
    if job is None:
        job_id = jobs.new_job(s, "counterfactual", {"attribution_id": attribution_id, "owner_id": owner_id,
                                                    "members": members.mask}, idempotency_key=key)
        tx.publish.append(job_id)
    else:
        job_id = job.id
        if job.status == "failed":
            job.status, job.error, job.attempts, job.payload = "queued", None, 0, {
                **job.payload, "members": members.mask}
            tx.publish.append(job_id)
    return OwnerCounterfactualAccepted(job_id=job_id, members_dropped=members.dropped,
                                       members_left=members.left,
                                       image_url=_image_url(attribution_id, owner_id))


def owner_counterfactual_png(s: Session, attribution_id: int, owner_id: int) -> bytes:
    """The finished owner-level counterfactual's PNG, else 404 saying why."""
    job = s.scalar(select(Job).where(Job.idempotency_key == counterfactual_key(attribution_id, owner_id)))
    if job is None:
        raise HTTPException(404, f"no counterfactual of attribution {attribution_id} without owner "
                            f"{owner_id}: POST this URL without .png first")
    sha = (job.result or {}).get("image_sha")
    img = s.get(Image, sha) if sha else None
    if img is None:
        raise HTTPException(404, f"the counterfactual is not ready: job {job.id} is {job.status}")
    return img.png


@router.get("/attributions/{attribution_id}/shares/{owner_id}/counterfactual.png", responses=PNG,
            response_class=Response, summary="The owner-level counterfactual, once computed")
def get_owner_counterfactual(attribution_id: PathId, owner_id: PathId, _: OperatorDep, s: SessionDep,
                             scale: Scale = 1) -> Response:
    return png_response(owner_counterfactual_png(s, attribution_id, owner_id), scale)


@router.get("/me/shares", response_model=HolderSharePage, tags=["rights holder"],
            summary="Your share of each attributed generation where your works ranked")
async def get_my_shares(p: OwnerDep, db: DatabaseDep, reads: ReadsDep, settings: SettingsDep,
                        offset: Offset = 0, limit_: PageSize = 100) -> HolderSharePage:
    """Newest first; one attribution per generation (its newest). Definition: README, "Shares"."""
    check_limit("max_page_size", limit_, settings, "limit")
    assert p.owner_id is not None
    items, total = await reads.run(_holder_page, db, p.owner_id, offset, limit_)
    return HolderSharePage(items=[HolderSharePublic(**vars(h)) for h in items], total=total, offset=offset,
                           limit=limit_)


def _holder_page(db: Database, owner_id: int, offset: int,
                 limit_: int) -> tuple[list[shares.HolderShare], int]:
    with db.reads.connect() as c:
        return shares.holder_shares(c, owner_id, offset, limit_)


@router.get("/me/shares/days", response_model=HolderDays, tags=["rights holder"],
            summary="Your shares summed per day")
async def get_my_days(p: OwnerDep, db: DatabaseDep, reads: ReadsDep, days: Days = 30) -> HolderDays:
    assert p.owner_id is not None
    out = await reads.run(holder_days, db, p.owner_id, days)
    return HolderDays(days=[DayTotalPublic(day=d.day.isoformat(), total=d.total, attributable=d.attributable,
                                           share=d.share) for d in out])


def holder_days(db: Database, owner_id: int, days: int) -> list[shares.DayTotal]:
    with db.reads.connect() as c:
        return shares.holder_days(c, owner_id, days)
