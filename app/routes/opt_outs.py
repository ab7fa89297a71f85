"""Opt-outs: POST /works/{id}/opt-out withdraws a training work at once (exact unlearning) and
retrains the members that saw it in the background; GET /opt-outs/{id} follows it.

A rights holder withdraws their own works (another holder's work is 404), an operator any work.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response
from sqlalchemy.orm import Session

from app.auth import Principal
from app.deps import SessionDep, WriterDep, get_principal
from app.orm import OptOut, TrainingItem
from app.routes.common import ERRORS, PathId
from app.schemas import OptOutCreate, OptOutPublic
from app.unlearning import OptOutError, opt_out_work, opt_outs_public
from app.writer import Tx

router = APIRouter(tags=["opt-outs"], responses={k: v for k, v in ERRORS.items() if k != 403})
CallerDep = Annotated[Principal, Depends(get_principal)]


@router.post(
    "/works/{work_id}/opt-out",
    status_code=202,
    response_model=OptOutPublic,
    responses={200: {"model": OptOutPublic, "description": "the work was withdrawn before: its opt-out"}},
    summary="Withdraw a training work: at once from serving, then by retraining",
)
async def opt_out(
    work_id: PathId, body: OptOutCreate, p: CallerDep, writer: WriterDep, response: Response
) -> OptOutPublic:
    """Once this answers, every ensemble that trained on the work serves from the members that
    never saw it (weights renormalised over them): nothing generated afterwards depends on the
    work, and new attributions leave it out. A background job (kind `retrain`) then retrains
    exactly those members from scratch without it and serves the result as a new version.
    Follow `GET /opt-outs/{id}` (masked -> retraining -> restored). Asking again answers 200 with
    the same opt-out."""
    opt, created = await writer.run(lambda tx: _opt_out(tx, work_id, p, body.reason))
    if not created:
        response.status_code = 200
    return opt


def _opt_out(tx: Tx, work_id: int, p: Principal, reason: str) -> tuple[OptOutPublic, bool]:
    try:
        opt, created, job_ids = opt_out_work(tx.s, work_id, p.owner_id, reason)
    except OptOutError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    tx.publish += job_ids
    return opt_outs_public(tx.s, [opt.training_item_id])[opt.training_item_id], created


@router.get("/opt-outs/{opt_out_id}", response_model=OptOutPublic, summary="An opt-out and its progress")
def get_opt_out(opt_out_id: PathId, p: CallerDep, s: SessionDep) -> OptOutPublic:
    """Its state, the members of each ensemble that trained on the work, and the versions: the
    one that trained on it, the masked one, and the retrained one once restored."""
    return _visible(s, p, opt_out_id)


def _visible(s: Session, p: Principal, opt_out_id: int) -> OptOutPublic:
    opt = s.get(OptOut, opt_out_id)
    item = s.get(TrainingItem, opt.training_item_id) if opt is not None else None
    if opt is None or item is None or (p.owner_id is not None and item.owner_id != p.owner_id):
        raise HTTPException(404, f"opt-out {opt_out_id} not found")
    return opt_outs_public(s, [item.id])[item.id]
