"""Request and response bodies (``XCreate`` in, ``XPublic`` out). Limits that depend on
settings are checked in the routes (their messages name the setting)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _utc(d: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


Time = Annotated[datetime, AfterValidator(_utc)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorPublic(BaseModel):
    detail: Any = Field(description="what went wrong: a message, or a list of field errors (422)")


MAX_ID = 2**31 - 1  # integer primary keys (PostgreSQL int4)
MAX_SEED = 2**53 - 1  # JSON-safe integers (exact in every client's double)
SeedValue = Annotated[int, Field(ge=0, le=MAX_SEED)]
MAX_SEED_START = 2**52  # so that seed_start + count never leaves the seed range


class _SeedsIn(_In):
    """Exactly one of ``seeds`` or ``count`` (the JSON schema says so with oneOf)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["seeds"]}, {"required": ["count"]}]})

    ensemble_id: int | None = Field(None, ge=1, le=MAX_ID,
                                    description="ensemble to sample; default: the newest ready one")
    seeds: list[SeedValue] = Field(None, min_length=1, json_schema_extra={"uniqueItems": True},  # type: ignore[assignment]
                                   description="distinct noise seeds (0..2^53-1), one sample each; "
                                   "at most max_seeds_per_request (POST /generate) or max_batch_seeds "
                                   "(POST /batches)")
    count: int = Field(None, ge=1, description="instead of seeds: this many consecutive seeds "  # type: ignore[assignment]
                       "starting at seed_start (same limits as seeds)")
    seed_start: int = Field(0, ge=0, le=MAX_SEED_START, description="first seed with count")
    steps: int | None = Field(None, ge=1, description="sampling steps (default the ensemble's T; "
                              "fewer are respaced); at most max_steps, and more than the ensemble's T "
                              "is a conflict (409)")

    @model_validator(mode="after")
    def _one_of(self) -> _SeedsIn:
        if (self.seeds is None) == (self.count is None):
            raise ValueError("give exactly one of 'seeds' or 'count'")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("'seeds' must be distinct")
        return self

    def num_seeds(self) -> int:
        return len(self.seeds) if self.seeds is not None else int(self.count)

    def seed_list(self) -> list[int]:
        """The seeds; check num_seeds() against the limit first (count may be huge)."""
        if self.seeds is not None:
            return list(self.seeds)
        return list(range(self.seed_start, self.seed_start + self.count))


class GenerateCreate(_SeedsIn):
    pass


class GenerateAccepted(BaseModel):
    job_id: str
    generation_ids: list[int] = Field(description="one per seed, in request order")
    ensemble_id: int
    steps: int


class AttributeOptions(_In):
    method: Literal["synthetic", "exact"] = Field(
        "synthetic", description="synthetic: one Jacobian ranks every source (fast); exact: one "
        "counterfactual sampling run per source (slow, exact)")
    metric: Literal["l2", "lpips"] = Field("l2", description="distance between sample and counterfactual")
    top_k: int = Field(10, ge=1, description="sources reported; at most max_top_k")
    verify_top_k: int = Field(0, ge=0, description="exact counterfactuals for the top K of a synthetic "
                              "ranking (at most max_verify_top_k; more than top_k verifies all top_k; "
                              "ignored for method=exact)")


class AttributeCreate(AttributeOptions):
    generation_id: int = Field(ge=1, le=MAX_ID, description="the generation to attribute")


class AttributeAccepted(BaseModel):
    job_id: str
    attribution_id: int


class JobPublic(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float = Field(description="0..1")
    error: str | None
    attempts: int = Field(description="times a worker started it")
    result: dict[str, Any] | None
    batch_id: int | None
    created_at: Time
    updated_at: Time
    started_at: Time | None
    finished_at: Time | None


class GenerationPublic(BaseModel):
    id: int
    ensemble_id: int
    seed: int
    steps: int
    status: Literal["pending", "done"]
    image_url: str | None = Field(description="the PNG, once sampled")
    image_sha256: str | None
    has_jacobian: bool
    created_at: Time
    finished_at: Time | None


class EntryPublic(BaseModel):
    rank: int = Field(description="1 = most influential")
    training_item_id: int
    external_ref: str
    label: int | None
    owner_id: int | None
    owner_name: str | None
    score: float = Field(description="distance between the sample and its counterfactual without this "
                         "work (synthetic estimate, or exact for method=exact)")
    exact_score: float | None = Field(description="exact distance, where verified")
    counterfactual_url: str = Field(description="PNG of the counterfactual: exact where verified, "
                                    "else predicted by synthetic ablation")
    counterfactual_kind: Literal["exact", "predicted"]


class AttributionPublic(BaseModel):
    id: int
    generation_id: int
    method: str
    metric: str
    top_k: int
    verify_top_k: int
    status: Literal["pending", "running", "succeeded", "failed"]
    agreement: dict[str, float] | None = Field(description="synthetic vs exact on the verified entries")
    created_at: Time
    finished_at: Time | None
    entries: list[EntryPublic]


class BatchCreate(_SeedsIn):
    """Like GenerateCreate, but up to max_batch_seeds seeds, optionally attributed."""

    attribute: AttributeOptions | None = Field(None, description="also attribute every sample")


class BatchAccepted(BaseModel):
    batch_id: int
    total: int
    job_ids: list[str]


class BatchPublic(BaseModel):
    id: int
    ensemble_id: int
    steps: int
    total: int = Field(description="samples in the batch")
    attribute: dict[str, Any] | None
    jobs: dict[str, int] = Field(description="job count by status")
    progress: float = Field(description="0..1 over all jobs of the batch")
    done: bool = Field(description="every job finished (succeeded or failed)")
    generation_ids: list[int]
    attribution_ids: list[int]
    created_at: Time


class WorkPublic(BaseModel):
    id: int
    dataset_id: int
    external_ref: str
    label: int | None
    sha256: str
    image_url: str


class WorkPage(BaseModel):
    items: list[WorkPublic]
    total: int
    offset: int
    limit: int


class InfluencePublic(BaseModel):
    attribution_id: int
    generation_id: int
    ensemble_id: int
    seed: int
    rank: int
    top_k: int
    method: str
    metric: str
    score: float
    exact_score: float | None
    generation_url: str = Field(description="the generated image (PNG)")
    counterfactual_url: str = Field(description="the generation without this work (PNG)")
    created_at: Time


class InfluencePage(BaseModel):
    work_id: int
    items: list[InfluencePublic]
    total: int
    offset: int
    limit: int
