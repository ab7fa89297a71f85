"""The data model (DESIGN.md section 4). The schema changes only through migrations/."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


Timestamp = DateTime(timezone=True)

JOB_STATUSES = ("queued", "running", "succeeded", "failed")
JOB_KINDS = ("generate", "attribute", "validate", "retrain", "counterfactual")
JOB_QUEUES = ("interactive", "long")  # app.queue.QUEUES (kept here so the schema imports no Celery)
ENSEMBLE_STATUSES = ("training", "ready", "retired", "superseded")
OPT_OUT_STATES = ("masked", "retraining", "restored")


class Image(Base):
    """A PNG stored once, keyed by the SHA-256 of its bytes."""

    __tablename__ = "image"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    png: Mapped[bytes] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Dataset(Base):
    __tablename__ = "dataset"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    channels: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    item_count: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Owner(Base):
    """A rights holder."""

    __tablename__ = "owner"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ApiKey(Base):
    """An API key: ``attrib_<prefix>_<secret>``; only SHA-256 of the whole key is stored.

    owner_id NULL means an operator key. Revoked keys stay (audit) with revoked_at set.
    """

    __tablename__ = "api_key"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owner.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class WebSession(Base):
    """A signed-in browser (app.web): the cookie holds a random token, only its SHA-256 is stored,
    so a leaked table opens no session. ``key_id`` is the API key signed in with (NULL for the
    environment's operator key): revoking that key ends its sessions. ``owner_id`` NULL is an
    operator. ``csrf_token`` is what every form of the session must send back."""

    __tablename__ = "web_session"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_key.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owner.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class TrainingItem(Base):
    """A training work. ``index`` is its position in the dataset (the engine's item index)."""

    __tablename__ = "training_item"
    __table_args__ = (UniqueConstraint("dataset_id", "index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owner.id", ondelete="SET NULL"), index=True)
    external_ref: Mapped[str] = mapped_column(String(500), default="")
    label: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_sha: Mapped[str] = mapped_column(ForeignKey("image.sha256"))


class EnsembleRow(Base):
    """One version of an ensemble. A registered checkpoint starts a lineage (``lineage_id`` = its
    id); an opt-out or a retrain adds a version (``parent_id``: the one it replaces, which becomes
    ``superseded``), so a generation keeps the version that made it. A version never changes:
    ``served_members`` (bitmask) are the members it samples with, ``withdrawn`` the training item
    ids opted out of it, ``manifests`` (retrained versions) a SHA-256 per member of its split."""

    __tablename__ = "ensemble"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"), index=True)
    n: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    T: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    granularity: Mapped[str] = mapped_column(String(16))
    checkpoint: Mapped[str] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    lineage_id: Mapped[int | None] = mapped_column(Integer, index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("ensemble.id", ondelete="SET NULL"))
    served_members: Mapped[int] = mapped_column(BigInteger)
    withdrawn: Mapped[list[int]] = mapped_column(JSON, default=list)
    manifests: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    __table_args__ = (
        CheckConstraint("n >= 1 AND n <= 62 AND k >= 1 AND k < n", name="n_k"),
        CheckConstraint(f"status IN ({', '.join(map(repr, ENSEMBLE_STATUSES))})", name="status"),
    )


class SourceCode(Base):
    """The code of one source (a training item, for item granularity) in one ensemble.

    ``source_index`` is the source's row in the engine's code book. Codes are written only by
    app.registry, which checks them first (distinct, weight k, Definition 1); the database
    enforces distinctness (UNIQUE) and positivity.
    """

    __tablename__ = "source_code"
    __table_args__ = (
        UniqueConstraint("ensemble_id", "code"),
        UniqueConstraint("ensemble_id", "source_index"),
        CheckConstraint("code > 0", name="code_positive"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ensemble_id: Mapped[int] = mapped_column(ForeignKey("ensemble.id", ondelete="CASCADE"))
    source_index: Mapped[int] = mapped_column(Integer)
    source_key: Mapped[str] = mapped_column(String(200))
    training_item_id: Mapped[int | None] = mapped_column(ForeignKey("training_item.id", ondelete="CASCADE"),
                                                         index=True)
    code: Mapped[int] = mapped_column(BigInteger)


class OptOut(Base):
    """A training work withdrawn by its rights holder (``owner_id``) or an operator (NULL). One
    per work: asking again returns this one."""

    __tablename__ = "opt_out"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    training_item_id: Mapped[int] = mapped_column(ForeignKey("training_item.id", ondelete="CASCADE"),
                                                  unique=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owner.id", ondelete="SET NULL"))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class OptOutEffect(Base):
    """What an opt-out did to one ensemble lineage: the version that trained on the work, the
    members S(x) it dropped (bitmask), the masked version that answered at once, the retrain job,
    and the version restored by it.

        masked --(the retrain job starts a plan with the work)--> retraining --(registered)--> restored
    """

    __tablename__ = "opt_out_effect"
    __table_args__ = (
        UniqueConstraint("opt_out_id", "lineage_id"),
        CheckConstraint(f"state IN ({', '.join(map(repr, OPT_OUT_STATES))})", name="state"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    opt_out_id: Mapped[int] = mapped_column(ForeignKey("opt_out.id", ondelete="CASCADE"))
    lineage_id: Mapped[int] = mapped_column(Integer, index=True)
    trained_version_id: Mapped[int] = mapped_column(ForeignKey("ensemble.id", ondelete="CASCADE"))
    members: Mapped[int] = mapped_column(BigInteger)
    masked_version_id: Mapped[int] = mapped_column(ForeignKey("ensemble.id", ondelete="CASCADE"))
    restored_version_id: Mapped[int | None] = mapped_column(ForeignKey("ensemble.id", ondelete="SET NULL"))
    job_id: Mapped[str | None] = mapped_column(String(36))
    state: Mapped[str] = mapped_column(String(16), default="masked")
    restored_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Generation(Base):
    """One sample: (ensemble, seed, steps) determines it, so it is stored once.

    sample: float32 bytes of x_0 (C*H*W) in [-1, 1]; jacobian: float32 (C*H*W, n) of the
    sample with respect to the member weights; gram: float64 (n, n) = J^T J.
    """

    __tablename__ = "generation"
    __table_args__ = (UniqueConstraint("ensemble_id", "seed", "steps"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ensemble_id: Mapped[int] = mapped_column(ForeignKey("ensemble.id", ondelete="CASCADE"))
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    image_sha: Mapped[str | None] = mapped_column(ForeignKey("image.sha256"))
    sample: Mapped[bytes | None] = mapped_column(LargeBinary)
    jacobian: Mapped[bytes | None] = mapped_column(LargeBinary)
    gram: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Attribution(Base):
    __tablename__ = "attribution"
    __table_args__ = (
        UniqueConstraint("generation_id", "method", "metric", "top_k", "verify_top_k", "score"),
        CheckConstraint("method IN ('synthetic', 'exact')", name="method"),
        CheckConstraint("metric IN ('l2', 'lpips')", name="metric"),
        CheckConstraint("score IN ('influence', 'resemblance')", name="score"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("generation.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(16))
    top_k: Mapped[int] = mapped_column(Integer)
    verify_top_k: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[str] = mapped_column(String(16), default="influence", server_default="influence")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    agreement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # attributable: the selective test names a work (None: not measured);
    # significance: how that was decided (models.attribute.Significance); near_copy: the copy check
    # (models.copies.CopyCheck), copy_of_item_id: the work it is a near-copy of
    attributable: Mapped[bool | None] = mapped_column(Boolean)
    significance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    near_copy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # causal: the authors' measures (models.causality.CausalMeasures): radius, top_changes_nearest
    causal: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    copy_of_item_id: Mapped[int | None] = mapped_column(ForeignKey("training_item.id", ondelete="SET NULL"))
    job_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class AttributionEntry(Base):
    """One ranked training item. score: the attribution's ranking score (influence or resemblance),
    synthetic (or exact, for method=exact); exact_score where verified; both scores and the decoy
    p-value, synthetic and exact, beside it; counterfactual_sha: the exact counterfactual's PNG
    where one was computed."""

    __tablename__ = "attribution_entry"
    __table_args__ = (
        UniqueConstraint("attribution_id", "rank"),
        UniqueConstraint("attribution_id", "training_item_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    attribution_id: Mapped[int] = mapped_column(ForeignKey("attribution.id", ondelete="CASCADE"))
    training_item_id: Mapped[int] = mapped_column(ForeignKey("training_item.id", ondelete="CASCADE"),
                                                  index=True)
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    exact_score: Mapped[float | None] = mapped_column(Float)
    influence: Mapped[float | None] = mapped_column(Float)
    exact_influence: Mapped[float | None] = mapped_column(Float)
    resemblance: Mapped[float | None] = mapped_column(Float)
    exact_resemblance: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    exact_p_value: Mapped[float | None] = mapped_column(Float)
    # in an attributable attribution, its p-value survives the correction too; False in one that is
    # not attributable (its shares: none); None where not measured (app.shares)
    significant: Mapped[bool | None] = mapped_column(Boolean)
    counterfactual_sha: Mapped[str | None] = mapped_column(ForeignKey("image.sha256"))


class Batch(Base):
    __tablename__ = "batch"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ensemble_id: Mapped[int] = mapped_column(ForeignKey("ensemble.id", ondelete="CASCADE"))
    steps: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    attribute: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    generation_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Job(Base):
    """A unit of work. The database is the source of truth; the broker carries only ``id``."""

    __tablename__ = "job"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(map(repr, JOB_STATUSES))})", name="status"),
        CheckConstraint(f"kind IN ({', '.join(map(repr, JOB_KINDS))})", name="kind"),
        CheckConstraint(f"queue IN ({', '.join(map(repr, JOB_QUEUES))})", name="queue"),
        Index("ix_job_status_updated_at", "status", "updated_at"),
        # Jobs waiting in a queue, in the order they were sent: GET /jobs/{id} counts those ahead,
        # the reaper counts those whose message no worker has received yet.
        Index("ix_job_queue_status_enqueued_at", "queue", "status", "enqueued_at"),
        Index("ix_job_kind_created_at", "kind", "created_at"),  # GET /validations, newest first
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(16), default="interactive", server_default="interactive")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batch.id", ondelete="CASCADE"), index=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(Timestamp)  # last sent to the broker
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)  # a worker last received it
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    heartbeat_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
