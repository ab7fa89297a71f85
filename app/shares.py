"""Shares: how much of one attribution each rights holder gets, and a holder's totals over time.

Definition (README "Shares"). An attribution ranks its top k training works; each entry has a
score, the attribution's ranking score (resemblance or influence, README "Trust"; the exact value
where verified, else the synthetic estimate). An entry's *weight* is that score where it is
positive and the entry is significant, else 0 (a work whose removal changes nothing had no
influence). Where p-values exist, only the works the attribution names count: an attributable
attribution's entries whose p-value survives its correction; an attribution that is not
attributable has no weight at all. The share of owner o in attribution a is

    share(a, o) = (sum of the weights of o's works ranked in a) / (sum of all weights in a).

Works without a rights holder are one line of their own (owner None), so the shares of an
attribution sum to 1 over its lines. An attribution whose weights are all 0 (or that ranked
nothing) is *unattributed*: it has no shares, and is never divided by zero. The shares cover the
reported top k, not the works below it.

Totals over time count one attribution per generation, its newest succeeded one, so that a
generation attributed twice (another top_k or metric) is not counted twice. A holder's total for
a day is the sum of its shares over the counted attributions finished that day (in generations'
worth), and its share of the day is that total divided by the day's attributable generations.

Owner-level counterfactual: the generation resampled with the same noise and every member
trained on any of the owner's works dropped (the union of their codes), the remaining members
weighted equally. Refused when fewer than ``owner_counterfactual_min_members`` would remain.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from fastapi import HTTPException
from sqlalchemy import Connection, Date, Float, bindparam, case, cast, func, select
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from app.orm import Attribution, AttributionEntry, EnsembleRow, Generation, Owner, SourceCode, TrainingItem

_SCORE = func.coalesce(AttributionEntry.exact_score, AttributionEntry.score)
WEIGHT: ColumnElement[float] = case(
    ((_SCORE > 0) & func.coalesce(AttributionEntry.significant, True), _SCORE), else_=0.0)
"""An entry's weight in SQL: its score (exact where verified) where positive and not ruled out by
significance, else 0."""

_NEWER = aliased(Attribution)
COUNTED: ColumnElement[bool] = (Attribution.status == "succeeded") & (
    Attribution.id == select(func.max(_NEWER.id))
    .where(_NEWER.generation_id == Attribution.generation_id, _NEWER.status == "succeeded")
    .correlate(Attribution).scalar_subquery())
"""The attribution counted for its generation in totals: its newest succeeded one."""


@dataclass(frozen=True)
class OwnerShare:
    owner_id: int | None
    owner_name: str | None
    share: float
    works: int  # the owner's works in the ranking (weight 0 included)


@dataclass(frozen=True)
class AttributionShares:
    attribution_id: int
    attributable: bool
    shares: list[OwnerShare]  # largest first; empty when unattributed


def attribution_shares(s: Session, attribution_id: int) -> AttributionShares:
    """Each owner's share of one attribution (the definition above)."""
    rows = s.execute(
        select(TrainingItem.owner_id, Owner.name, func.sum(WEIGHT).label("weight"),
               func.count().label("works"))
        .select_from(AttributionEntry)
        .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
        .outerjoin(Owner, Owner.id == TrainingItem.owner_id)
        .where(AttributionEntry.attribution_id == attribution_id)
        .group_by(TrainingItem.owner_id, Owner.name)).all()
    total = sum(float(r.weight) for r in rows)
    if total <= 0:
        return AttributionShares(attribution_id, False, [])
    shares = [OwnerShare(r.owner_id, r.name, float(r.weight) / total, int(r.works)) for r in rows]
    shares.sort(key=lambda o: (-o.share, o.owner_id is None, o.owner_id or 0))
    return AttributionShares(attribution_id, True, shares)


_MINE = func.sum(case((TrainingItem.owner_id == bindparam("owner_id"), WEIGHT), else_=0.0))
_ALL = func.sum(WEIGHT)


@dataclass(frozen=True)
class HolderShare:
    attribution_id: int
    generation_id: int
    finished_at: datetime
    share: float
    works: int  # the holder's works ranked in it


def holder_shares(c: Connection, owner_id: int, offset: int, limit: int) -> tuple[list[HolderShare], int]:
    """The counted attributions where the holder has a share, newest first: a page, and how many
    there are in all."""
    ranked_mine = (select(AttributionEntry.attribution_id)
                   .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
                   .where(TrainingItem.owner_id == bindparam("owner_id")))
    q = (select(Attribution.id, Attribution.generation_id, Attribution.finished_at, Attribution.created_at,
                (_MINE / _ALL).label("share"),
                func.sum(case((TrainingItem.owner_id == bindparam("owner_id"), 1), else_=0)).label("works"),
                func.count().over().label("total"))
         .select_from(Attribution).join(AttributionEntry, AttributionEntry.attribution_id == Attribution.id)
         .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
         .where(COUNTED, Attribution.id.in_(ranked_mine))
         .group_by(Attribution.id, Attribution.generation_id, Attribution.finished_at,
                   Attribution.created_at)
         .having(_MINE > 0))
    rows = c.execute(q.order_by(Attribution.id.desc()).offset(offset).limit(limit),
                     {"owner_id": owner_id}).all()
    if not rows and offset:  # past the last page: no row carries the total
        total = c.scalar(select(func.count()).select_from(q.subquery()), {"owner_id": owner_id}) or 0
        return [], int(total)
    items = [HolderShare(r.id, r.generation_id, _utc(r.finished_at or r.created_at), float(r.share),
                         int(r.works)) for r in rows]
    return items, int(rows[0].total) if rows else 0


def holder_share_in(c: Connection, owner_id: int, attribution_ids: list[int]) -> dict[int, float]:
    """The holder's share of each of these attributions (those unattributed are left out)."""
    if not attribution_ids:
        return {}
    rows = c.execute(select(AttributionEntry.attribution_id, (_MINE / _ALL).label("share"))
                     .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
                     .where(AttributionEntry.attribution_id.in_(attribution_ids))
                     .group_by(AttributionEntry.attribution_id).having(_ALL > 0),
                     {"owner_id": owner_id}).all()
    return {int(r.attribution_id): float(r.share) for r in rows}


@dataclass(frozen=True)
class DayTotal:
    day: date
    total: float  # the holder's shares summed over the day's counted attributions
    attributable: int  # the day's attributable generations (every holder)

    @property
    def share(self) -> float:
        return self.total / self.attributable if self.attributable else 0.0


def _day(c: Connection, column: ColumnElement[datetime]) -> ColumnElement[date]:
    """The UTC day of a timestamp column (SQLite stores naive UTC text; PostgreSQL timestamptz)."""
    if c.dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)  # type: ignore[no-any-return]


def holder_days(c: Connection, owner_id: int, days: int, today: date | None = None) -> list[DayTotal]:
    """The holder's totals per UTC day over the last ``days`` days (today included), one entry per
    day, oldest first (days without an attributable generation have zeros)."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    since = datetime(first.year, first.month, first.day, tzinfo=UTC)
    finished = func.coalesce(Attribution.finished_at, Attribution.created_at)
    per_attribution = (
        select(_day(c, finished).label("day"), (_MINE / _ALL).label("mine"))
        .select_from(Attribution).join(AttributionEntry, AttributionEntry.attribution_id == Attribution.id)
        .join(TrainingItem, TrainingItem.id == AttributionEntry.training_item_id)
        .where(COUNTED, finished >= since)
        .group_by(Attribution.id, finished).having(_ALL > 0).subquery())
    mine = func.sum(cast(per_attribution.c.mine, Float))
    rows = c.execute(select(per_attribution.c.day, mine, func.count())
                     .group_by(per_attribution.c.day), {"owner_id": owner_id}).all()
    found = {_as_date(d): (float(total or 0.0), int(n)) for d, total, n in rows}
    out = []
    for i in range(days):
        d = first + timedelta(days=i)
        total, n = found.get(d, (0.0, 0))
        out.append(DayTotal(d, total, n))
    return out


def _as_date(d: date | str) -> date:
    return date.fromisoformat(d) if isinstance(d, str) else d


def _utc(d: datetime) -> datetime:
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


@dataclass(frozen=True)
class OwnerMembers:
    """The members an owner-level counterfactual drops: the union of the owner's works' codes."""

    ensemble_id: int
    n: int
    mask: int  # bit i set: member i trained on at least one of the owner's works
    served: int  # bit i set: the version serves member i (opt-outs mask the others)

    @property
    def dropped(self) -> int:
        return self.mask.bit_count()

    @property
    def left(self) -> int:
        """Members the counterfactual keeps: served, and trained on none of the owner's works."""
        return (self.served & ~self.mask).bit_count()


def owner_members(s: Session, attribution_id: int, owner_id: int, min_members: int) -> OwnerMembers:
    """The members to drop for ``owner_id`` in the ensemble of ``attribution_id``: 404 when the
    attribution or the owner's works in that ensemble are missing, 409 (with the reason) when fewer
    than ``min_members`` would remain."""
    att = s.get(Attribution, attribution_id)
    if att is None:
        raise HTTPException(404, f"attribution {attribution_id} not found")
    owner = s.get(Owner, owner_id)
    if owner is None:
        raise HTTPException(404, f"owner {owner_id} not found")
    ens = s.scalar(select(EnsembleRow).join(Generation, Generation.ensemble_id == EnsembleRow.id)
                   .where(Generation.id == att.generation_id))
    assert ens is not None
    mask = 0
    for code in s.scalars(select(SourceCode.code)
                          .join(TrainingItem, TrainingItem.id == SourceCode.training_item_id)
                          .where(SourceCode.ensemble_id == ens.id, TrainingItem.owner_id == owner_id)):
        mask |= int(code)
    if mask == 0:
        raise HTTPException(404, f"owner {owner_id} has no works in ensemble {ens.id}")
    members = OwnerMembers(ens.id, ens.n, mask, ens.served_members)
    if members.left < min_members:
        raise HTTPException(409, f"owner {owner_id}'s works were seen by {members.dropped} of the "
                            f"{ens.n} members of ensemble {ens.id}: dropping them from the ones it "
                            f"serves would leave {members.left}, fewer than "
                            f"owner_counterfactual_min_members={min_members}")
    return members
