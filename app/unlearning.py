"""Opt-out as exact unlearning on the service's database: what the API, the worker and the CLI
call (models.unlearn does the computing).

    opt_out_work     the opt-out row; at once, every serving version that trained on the work
                     is superseded by a *masked* version (same checkpoint, its members S(x)
                     dropped, weights renormalised over the rest), and its lineage gets a
                     retrain job (or joins the one queued or running)
    retrain_lineage  what that job does: retrain the dropped members from scratch without every
                     withdrawn work, register the result as the next version, serve it

A version never changes once written, so a generation keeps the version that made it. Serving
moves from one version to the next only by a compare-and-set of its status (ready ->
superseded), so an opt-out and a retrain finishing at the same moment cannot both take over a
lineage: the loser re-reads it (the retrain plans again, with every work withdrawn meanwhile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, func, insert, literal, select, update
from sqlalchemy.orm import Session

from app import jobs
from app.db import Database
from app.orm import EnsembleRow, Job, OptOut, OptOutEffect, SourceCode, TrainingItem, utcnow
from app.schemas import OptOutEnsemblePublic, OptOutPublic
from models.codes import mask_bits, member_manifests

if TYPE_CHECKING:
    import torch

    from models.train import TrainConfig

log = logging.getLogger(__name__)
_CHUNK = 500  # rows per IN list
Progress = Callable[[float], None]


class OptOutError(Exception):
    """A refusal with a message for the user; ``status`` is the HTTP answer that fits it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PlanChanged(Exception):
    """The lineage got another version while a retrain ran: plan it again."""


# --------------------------------------------------------------------------- versions
def head_of(s: Session, lineage_id: int) -> EnsembleRow | None:
    """The version of the lineage that serves now (status ready), if any."""
    return s.scalar(
        select(EnsembleRow)
        .where(EnsembleRow.lineage_id == lineage_id, EnsembleRow.status == "ready")
        .order_by(EnsembleRow.id.desc())
    )


def _supersede(s: Session, version_id: int) -> bool:
    """Take a lineage over from ``version_id``: ready -> superseded, if it still is ready."""
    res = s.execute(
        update(EnsembleRow)
        .where(EnsembleRow.id == version_id, EnsembleRow.status == "ready")
        .values(status="superseded")
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


_COPY_CODES = insert(cast(Table, SourceCode.__table__))


def _new_version(
    s: Session,
    parent: EnsembleRow,
    *,
    served: int,
    withdrawn: list[int],
    checkpoint: str,
    manifests: list[str] | None,
) -> EnsembleRow:
    """The next version of ``parent``'s lineage (ready), with the parent's codes (one INSERT ...
    SELECT: codes belong to the code book, which a retrain does not change)."""
    assert parent.lineage_id is not None
    root = s.get(EnsembleRow, parent.lineage_id)
    number = (s.scalar(select(func.count()).where(EnsembleRow.lineage_id == parent.lineage_id)) or 0) + 1
    row = EnsembleRow(
        name=f"{root.name if root else parent.name}~v{number}",
        dataset_id=parent.dataset_id,
        n=parent.n,
        k=parent.k,
        T=parent.T,
        config=parent.config,
        granularity=parent.granularity,
        checkpoint=checkpoint,
        status="ready",
        lineage_id=parent.lineage_id,
        parent_id=parent.id,
        served_members=served,
        withdrawn=withdrawn,
        manifests=manifests,
    )
    s.add(row)
    s.flush()
    columns = (SourceCode.source_index, SourceCode.source_key, SourceCode.training_item_id, SourceCode.code)
    s.execute(
        _COPY_CODES.from_select(
            ["ensemble_id", "source_index", "source_key", "training_item_id", "code"],
            select(literal(row.id), *columns).where(SourceCode.ensemble_id == parent.id),
        )
    )
    return row


# ---------------------------------------------------------------------------- opt out
def opt_out_work(
    s: Session, work_id: int, owner_id: int | None, reason: str
) -> tuple[OptOut, bool, list[str]]:
    """Withdraw a work, in the caller's transaction: (the opt-out, whether it is new, ids of the
    retrain jobs created, to publish once committed). ``owner_id``: the rights holder asking (their
    own works only: another's is 404, like a missing one), or None for an operator. Asking again
    returns the first opt-out unchanged."""
    item = s.get(TrainingItem, work_id)
    if item is None or (owner_id is not None and item.owner_id != owner_id):
        raise OptOutError(404, f"work {work_id} not found")
    old = s.scalar(select(OptOut).where(OptOut.training_item_id == work_id))
    if old is not None:
        return old, False, []
    opt = OptOut(training_item_id=work_id, owner_id=owner_id, reason=reason, created_at=utcnow())
    s.add(opt)
    s.flush()
    created: list[str] = []
    masked: set[int] = set()  # lineages
    for _ in range(3):  # a head taken over meanwhile (a retrain finishing): read the heads again
        heads = [
            h
            for h in s.scalars(
                select(EnsembleRow)
                .join(SourceCode, SourceCode.ensemble_id == EnsembleRow.id)
                .where(SourceCode.training_item_id == work_id, EnsembleRow.status == "ready")
                .order_by(EnsembleRow.id)
            )
            if h.lineage_id not in masked
        ]
        if not heads:
            return opt, True, created
        masked.update(h.lineage_id for h in heads if h.lineage_id is not None and _mask(s, opt, h, created))
    raise OptOutError(409, f"the ensembles that trained on work {work_id} kept changing; retry")


def _mask(s: Session, opt: OptOut, head: EnsembleRow, created: list[str]) -> bool:
    """Supersede ``head`` by a version without the work's members; False if it was taken over."""
    code = s.scalar(
        select(SourceCode.code).where(
            SourceCode.ensemble_id == head.id, SourceCode.training_item_id == opt.training_item_id
        )
    )
    assert code is not None and head.lineage_id is not None
    if not _supersede(s, head.id):
        return False
    masked = _new_version(
        s,
        head,
        served=head.served_members & ~int(code),
        withdrawn=[*head.withdrawn, opt.training_item_id],
        checkpoint=head.checkpoint,
        manifests=head.manifests,
    )
    # Opt-outs that hit the same lineage share its retrain: one queued or running picks this
    # one up (a running one notices the new version at its next saved state and plans again).
    job_id = s.scalar(
        select(OptOutEffect.job_id)
        .join(Job, Job.id == OptOutEffect.job_id)
        .where(OptOutEffect.lineage_id == head.lineage_id, Job.status.in_(("queued", "running")))
        .limit(1)
    )
    if job_id is None:
        job_id = jobs.new_job(s, "retrain", {"lineage_id": head.lineage_id})
        created.append(job_id)
    s.add(
        OptOutEffect(
            opt_out_id=opt.id,
            lineage_id=head.lineage_id,
            trained_version_id=head.id,
            members=int(code),
            masked_version_id=masked.id,
            job_id=job_id,
            state="masked",
        )
    )
    s.flush()
    return True


def retrain_in_progress(s: Session, version: EnsembleRow) -> str | None:
    """The retrain job of a version's lineage that is queued or running, if any."""
    return s.scalar(
        select(Job.id)
        .join(OptOutEffect, OptOutEffect.job_id == Job.id)
        .where(OptOutEffect.lineage_id == version.lineage_id, Job.status.in_(("queued", "running")))
        .limit(1)
    )


# ---------------------------------------------------------------------------- retrain
@dataclass(frozen=True)
class RetrainOptions:
    """Where a retrain keeps its files, what it runs on, and how often it saves its state."""

    checkpoint_dir: Path
    device: torch.device
    checkpoint_every: int


def retrain_lineage(
    db: Database,
    lineage_id: int,
    options: RetrainOptions,
    *,
    job_id: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Retrain the members the serving version of ``lineage_id`` dropped, from scratch on their
    splits without every work withdrawn from it, register the result as the next version (every
    member served, manifests recorded) and mark those opt-outs restored; with ``job_id``, finish
    that job in the same transaction. A version that drops no member needs nothing (the result
    names it). Resumes from the state a killed run saved; plans again when an opt-out arrives
    meanwhile, so the version registered has every withdrawn work out."""
    # The engine (torch) is loaded here, by the worker or the CLI that retrains: the API imports
    # this module for opt-outs and starts without it.
    from app.registry import RegistryError, stored_dataset
    from models.ensemble import Ensemble
    from models.unlearn import plan_retrain, retrain, retrain_config

    while True:
        with db.session() as s:
            head = head_of(s, lineage_id)
            if head is None:
                raise OptOutError(404, f"ensemble lineage {lineage_id} has no serving version to retrain")
            head_id, checkpoint, withdrawn = head.id, head.checkpoint, list(head.withdrawn)
            full = (1 << head.n) - 1
            if head.served_members == full:
                result = _result(lineage_id, head_id, head_id, [], withdrawn, 0)
                if job_id is not None:
                    jobs.finish(s, job_id, result)
                return result
            served, dataset_id = head.served_members, head.dataset_id
            sources = list(
                s.scalars(
                    select(SourceCode.source_index).where(
                        SourceCode.ensemble_id == head_id, SourceCode.training_item_id.in_(withdrawn)
                    )
                )
            )
            try:
                data = stored_dataset(s, dataset_id)
            except RegistryError as exc:
                raise OptOutError(409, str(exc)) from exc
            shas = list(
                s.scalars(
                    select(TrainingItem.sha256)
                    .where(TrainingItem.dataset_id == dataset_id)
                    .order_by(TrainingItem.index)
                )
            )
            s.execute(
                update(OptOutEffect)
                .where(
                    OptOutEffect.lineage_id == lineage_id,
                    OptOutEffect.state == "masked",
                    OptOutEffect.opt_out_id.in_(
                        select(OptOut.id).where(OptOut.training_item_id.in_(withdrawn))
                    ),
                )
                .values(state="retraining")
            )
        try:
            ens = Ensemble.load(checkpoint, options.device)
        except (FileNotFoundError, ValueError) as exc:
            raise OptOutError(409, f"ensemble {head_id}: {exc}") from exc
        if ens.dataset.fingerprint != data.fingerprint():
            raise OptOutError(409, f"ensemble {head_id} was trained on other data than dataset {dataset_id}")
        plan = plan_retrain(ens.codebook, sources)
        dropped = full & ~served
        if sum(1 << i for i in plan.members) != dropped:
            raise OptOutError(
                409,
                f"ensemble {head_id} drops members {dropped:#x}, but its withdrawn works "
                f"hit {sum(1 << i for i in plan.members):#x}",
            )
        try:
            cfg = retrain_config(ens, options.checkpoint_every)
        except ValueError as exc:
            raise OptOutError(409, f"ensemble {head_id}: {exc}") from exc
        state_path = options.checkpoint_dir / f"retrain-{lineage_id}-{head_id}.state.pt"

        def on_step(step: int, losses: torch.Tensor, head_id: int = head_id, cfg: TrainConfig = cfg) -> None:
            if progress is not None and (step % 10 == 0 or step == cfg.steps):
                progress(0.95 * step / cfg.steps)
            if step % cfg.checkpoint_every == 0 and not _still_serving(db, head_id):
                raise PlanChanged

        log.info("retraining members %s of ensemble %d without works %s", plan.members, head_id, withdrawn)
        try:
            new = retrain(ens, plan, data.to_tensor(), cfg, state_path=state_path, progress=on_step)
        except PlanChanged:
            state_path.unlink(missing_ok=True)
            continue
        out = options.checkpoint_dir / f"ensemble-{lineage_id}-retrained-{head_id}.pt"
        new.save(out)
        manifests = member_manifests(new.codebook, shas)
        with db.session() as s:
            parent = s.get(EnsembleRow, head_id)
            assert parent is not None
            registered = _supersede(s, head_id)
            if registered:
                version = _new_version(
                    s,
                    parent,
                    served=full,
                    withdrawn=withdrawn,
                    checkpoint=str(out.resolve()),
                    manifests=manifests,
                )
                s.execute(
                    update(OptOutEffect)
                    .where(
                        OptOutEffect.lineage_id == lineage_id,
                        OptOutEffect.state != "restored",
                        OptOutEffect.opt_out_id.in_(
                            select(OptOut.id).where(OptOut.training_item_id.in_(withdrawn))
                        ),
                    )
                    .values(state="restored", restored_version_id=version.id, restored_at=utcnow())
                )
                result = _result(lineage_id, head_id, version.id, list(plan.members), withdrawn,
                                 int((new.train_state or {}).get("resumed_from", 0)))
                if job_id is not None:
                    jobs.finish(s, job_id, result)
        state_path.unlink(missing_ok=True)
        if registered:
            return result
        out.unlink(missing_ok=True)  # an opt-out took the lineage over first: plan again


def _still_serving(db: Database, version_id: int) -> bool:
    with db.session() as s:
        return s.scalar(select(EnsembleRow.status).where(EnsembleRow.id == version_id)) == "ready"


def _result(
    lineage_id: int, parent_id: int, version_id: int, members: list[int], withdrawn: list[int],
    resumed_from: int,
) -> dict[str, Any]:
    return {
        "lineage_id": lineage_id,
        "parent_id": parent_id,
        "ensemble_id": version_id,
        "retrained_members": members,
        "withdrawn_works": withdrawn,
        "resumed_from_step": resumed_from,  # 0: trained from the start in one run
    }


def served_list(mask: int, n: int) -> list[int]:
    """The member indices of a bitmask."""
    return [int(i) for i, bit in enumerate(mask_bits(mask, n)) if bit]


def opt_outs_public(s: Session, work_ids: Sequence[int]) -> dict[int, OptOutPublic]:
    """The opt-outs of these works, by work id (works not withdrawn are absent)."""
    opts = {
        o.id: o
        for lo in range(0, len(work_ids), _CHUNK)
        for o in s.scalars(select(OptOut).where(OptOut.training_item_id.in_(work_ids[lo : lo + _CHUNK])))
    }
    effects: dict[int, list[OptOutEnsemblePublic]] = {i: [] for i in opts}
    order = {"masked": 0, "retraining": 1, "restored": 2}
    ids = list(opts)
    for lo in range(0, len(ids), _CHUNK):
        rows = s.execute(
            select(OptOutEffect, EnsembleRow.n)
            .join(EnsembleRow, EnsembleRow.id == OptOutEffect.trained_version_id)
            .where(OptOutEffect.opt_out_id.in_(ids[lo : lo + _CHUNK]))
            .order_by(OptOutEffect.id)
        ).all()
        for e, n in rows:
            head = head_of(s, e.lineage_id)
            effects[e.opt_out_id].append(
                OptOutEnsemblePublic(
                    lineage_id=e.lineage_id,
                    state=e.state,
                    members=served_list(e.members, n),  # type: ignore[arg-type]
                    trained_version_id=e.trained_version_id,
                    masked_version_id=e.masked_version_id,
                    restored_version_id=e.restored_version_id,
                    serving_version_id=head.id if head else None,
                    retrain_job_id=e.job_id,
                    restored_at=e.restored_at,
                )
            )
    out = {}
    for i, o in opts.items():
        states = [e.state for e in effects[i]]
        out[o.training_item_id] = OptOutPublic(
            id=o.id,
            work_id=o.training_item_id,
            state=min(states, key=order.__getitem__, default="restored"),  # type: ignore[arg-type]
            reason=o.reason,
            requested_by="operator" if o.owner_id is None else "holder",
            created_at=o.created_at,
            ensembles=effects[i],
        )
    return out
