"""Request and response bodies (``XCreate`` in, ``XPublic`` out). Limits that depend on
settings are checked in the routes (their messages name the setting)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from experiments import CONFIGS, AnyConfig
from experiments.configs import ClassifierKind


def _utc(d: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


Time = Annotated[datetime, AfterValidator(_utc)]


class _In(BaseModel):
    """A request body: unknown fields are errors, and so is any conversion (strict): ``false`` or
    ``"3"`` where an integer is expected is a 422, not 0 or 3. Subclasses inherit both."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data: Any) -> Any:
        """JSON Schema counts a number with no fraction (``7.0``) as an integer; so does the API."""
        return {k: _integral(v) for k, v in data.items()} if isinstance(data, dict) else data


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


class ErrorPublic(BaseModel):
    detail: Any = Field(description="what went wrong: a message, or a list of field errors (422)")


MAX_ID = 2**31 - 1  # integer primary keys (PostgreSQL int4)
MAX_SEED = 2**53 - 1  # JSON-safe integers (exact in every client's double)
SeedValue = Annotated[int, Field(ge=0, le=MAX_SEED)]
MAX_SEED_START = 2**52  # so that seed_start + count never leaves the seed range


class _SeedsIn(_In):
    """Exactly one of ``seeds`` or ``count`` (the JSON schema says so with oneOf)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["seeds"]}, {"required": ["count"]}]}
    )

    ensemble_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="ensemble to sample; default: the newest ready one"
    )
    # seeds and count default to None (exactly one is given) but are not nullable in the schema
    seeds: list[SeedValue] = Field(
        None,  # type: ignore[arg-type]
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="distinct noise seeds (0..2^53-1), one sample each; "
        "at most max_seeds_per_request (POST /generate) or max_batch_seeds "
        "(POST /batches)",
    )
    count: int = Field(  # type: ignore[assignment]
        None,
        ge=1,
        description="instead of seeds: this many consecutive seeds "
        "starting at seed_start (same limits as seeds)",
    )
    seed_start: int = Field(0, ge=0, le=MAX_SEED_START, description="first seed with count")
    steps: int | None = Field(
        None,
        ge=1,
        description="sampling steps (default the ensemble's T; "
        "fewer are respaced); at most max_steps, and more than the ensemble's T "
        "is a conflict (409)",
    )

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
    job_id: str = Field(description="the job doing the work: poll GET /jobs/{job_id}")
    generation_ids: list[int] = Field(description="one per seed, in request order")
    ensemble_id: int = Field(description="the ensemble that sampled it")
    steps: int = Field(description="sampling steps")


class AttributeOptions(_In):
    method: Literal["synthetic", "exact"] = Field(
        "synthetic",
        description="synthetic: one Jacobian ranks every source, and the top verify_top_k are re-ranked "
        "by exact counterfactuals (the default); exact: one counterfactual sampling run per source "
        "(slow, exact, no p-values)",
    )
    metric: Literal["l2", "lpips"] = Field("l2", description="distance between sample and counterfactual "
                                           "for influence (resemblance is always pixel L2)")
    score: Literal["influence", "resemblance"] | None = Field(
        None,
        description="what ranks: resemblance, how much further from the work's own image the generation "
        "moves when the members trained on it are removed (d(cf, x) - d(f, x)); or influence, the paper's "
        "distance between the generation and that counterfactual (||cf - f||). Both are reported either "
        "way. Default: the service's default_score for metric l2 (resemblance unless configured), "
        "influence for metric lpips",
    )
    top_k: int = Field(10, ge=1, description="sources reported; at most max_top_k")
    verify_top_k: int | None = Field(
        None,
        ge=0,
        description="how many of the synthetic top sources get an exact counterfactual and are re-ranked "
        "by their exact values (may exceed top_k; at most max_verify_top_k; default default_verify_top_k, "
        "fewer when the ensemble has fewer sources; ignored for method=exact)",
    )


class AttributeCreate(AttributeOptions):
    generation_id: int = Field(ge=1, le=MAX_ID, description="the generation to attribute")


class AttributeAccepted(BaseModel):
    job_id: str = Field(description="the job doing the work: poll GET /jobs/{job_id}")
    attribution_id: int = Field(
        description="the attribution: GET /attributions/{attribution_id} once the job succeeded"
    )


class JobPublic(BaseModel):
    id: str = Field(description="job id (UUID)")
    kind: str = Field(description="generate, attribute, validate, retrain (opt-outs) or counterfactual "
                      "(owner-level)")
    queue: Literal["interactive", "long"] = Field(description="where it waits for a worker: interactive "
                                                  "(generate, attribute, small batches) or long "
                                                  "(validations, large batches)")
    status: Literal["queued", "running", "succeeded", "failed"] = Field(description="life cycle state")
    waiting: str | None = Field(None, description="why it has not finished yet, when it waits: queued "
                                "behind N jobs of its queue, or running but stale (its worker lost)")
    ahead: int | None = Field(None, description="queued: jobs of its queue sent before it, which run first")
    stale: bool = Field(False, description="running, but no heartbeat for stale_after_s: its worker is "
                        "presumed lost and the job is re-sent; its progress is not moving")
    progress: float = Field(description="0..1")
    error: str | None = Field(description="why it failed, if it did")
    attempts: int = Field(description="times a worker started it")
    result: dict[str, Any] | None = Field(description="what it produced, once succeeded")
    batch_id: int | None = Field(description="the batch: GET /batches/{batch_id}")
    created_at: Time = Field(description="when it was created (UTC)")
    updated_at: Time = Field(description="last change, progress or heartbeat (UTC)")
    started_at: Time | None = Field(description="when a worker last started it (UTC)")
    finished_at: Time | None = Field(description="when it finished (UTC), if it has")


class GenerationPublic(BaseModel):
    id: int = Field(description="generation id")
    ensemble_id: int = Field(description="the ensemble that sampled it")
    seed: int = Field(description="noise seed: with the ensemble and steps it fixes the image")
    steps: int = Field(description="sampling steps")
    status: Literal["pending", "done"] = Field(description="life cycle state")
    image_url: str | None = Field(description="the PNG, once sampled")
    image_sha256: str | None = Field(description="SHA-256 of the PNG bytes")
    has_jacobian: bool = Field(
        description="whether the Jacobian with respect to the member weights is stored (after an attribution)"
    )
    created_at: Time = Field(description="when it was created (UTC)")
    finished_at: Time | None = Field(description="when it finished (UTC), if it has")


class EntryPublic(BaseModel):
    rank: int = Field(description="1 = first by the attribution's score (exact values where verified)")
    training_item_id: int = Field(description="the training work (GET /works/{id} for its owner)")
    external_ref: str = Field(description="the work's reference in its dataset (file name, index)")
    label: int | None = Field(description="the work's class label, if the dataset has labels")
    owner_id: int | None = Field(description="the rights holder owning the work, if any")
    owner_name: str | None = Field(description="that rights holder's name")
    score: float = Field(
        description="the ranking score (the attribution's `score`): synthetic estimate, or exact for "
        "method=exact"
    )
    exact_score: float | None = Field(description="the ranking score's exact value, where verified")
    influence: float | None = Field(None, description="||cf - f||, synthetic (exact for method=exact)")
    exact_influence: float | None = Field(None, description="||cf - f|| from the exact counterfactual")
    resemblance: float | None = Field(None, description="d(cf, x) - d(f, x), x the work's image: synthetic "
                                      "(exact for method=exact)")
    exact_resemblance: float | None = Field(None, description="the same from the exact counterfactual")
    p_value: float | None = Field(None, description="how often removing a random set of k members (a "
                                  "decoy code) moves the generation away from this work at least as much "
                                  "(synthetic resemblance); see the attribution's significance")
    exact_p_value: float | None = Field(None, description="the same for the exact resemblance, where "
                                        "verified")
    significant: bool | None = Field(None, description="the attribution names this work: it is attributable "
                                     "and this work's p-value survives the same correction (null where no "
                                     "p-values exist); only named works share in the attribution")
    counterfactual_url: str = Field(
        description="PNG of the counterfactual: exact where verified, else predicted by synthetic ablation"
    )
    counterfactual_kind: Literal["exact", "predicted"] = Field(
        description="exact (computed by re-sampling) or predicted (synthetic ablation, f + J dw)"
    )
    withdrawn_at: Time | None = Field(
        None, description="when the work was withdrawn (opted out), if it was: this ranking was made "
        "before then (new rankings leave withdrawn works out)"
    )


class CandidatePublic(BaseModel):
    training_item_id: int = Field(description="a work among those nearest the generation (pixel L2)")
    distance: float = Field(description="pixel L2 distance between the generation and the work's image")
    p_value: float = Field(description="empirical decoy p-value of its synthetic resemblance")


class CataloguePublic(BaseModel):
    sources: int = Field(description="works ranked (the correction runs over all of them)")
    threshold: float = Field(description="alpha / sources")
    p_method: str = Field(description="empirical, or gaussian tail (a normal fit of the decoys) where "
                          "1 / (1 + decoys) cannot reach the threshold")
    top_p: float | None = Field(description="the top work's p-value by that method")
    attributable: bool = Field(description="top_p <= threshold: a stricter figure, never deciding")


class SignificancePublic(BaseModel):
    attributable: bool = Field(description="the selective test: the best of the candidates (the works "
                               "nearest the generation, chosen by content, blind to the codes) has an "
                               "empirical decoy p-value <= alpha / sources_tested; that work is named and "
                               "ranks first")
    reason: str = Field(description="why not, when not attributable (empty when it is)")
    alpha: float = Field(description="family-wise error level")
    test: str = Field("catalogue", description="selective (today); catalogue for attributions stored "
                      "before the selective test, decided over every work ranked")
    sources_tested: int = Field(description="works the correction runs over (the candidates)")
    decoys: int = Field(description="decoy codes (weight-k codes no work holds) the p-values count against")
    threshold: float = Field(description="alpha / sources_tested")
    p_method: str = Field(description="empirical: (1 + #decoys at least as high) / (1 + decoys)")
    top_p: float | None = Field(description="the top work's p-value")
    candidates: list[CandidatePublic] = Field([], description="the works tested, nearest first")
    named_training_item_id: int | None = Field(None, description="the work the test names, if any")
    catalogue: CataloguePublic | None = Field(None, description="the whole-catalogue test, a second, "
                                              "stricter figure")


class CausalPublic(BaseModel):
    radius: float | None = Field(description="the authors' counterfactual radius: the largest pixel L2 "
                                 "distance between the generation and the exact counterfactuals of the "
                                 "verified works (over those only); 0 means no verified work moves it")
    radius_over_verified: int = Field(description="how many works' exact counterfactuals the radius is over")
    nearest_training_item_id: int = Field(description="the generation's nearest training work")
    top_counterfactual_nearest_training_item_id: int | None = Field(
        description="the nearest training work of the top work's exact counterfactual (null: not verified)")
    top_changes_nearest: bool | None = Field(description="whether dropping the top work changes the "
                                             "generation's nearest training image (the authors' test of a "
                                             "causal attribution)")


class NearestWork(BaseModel):
    training_item_id: int = Field(description="a training work")
    distance: float = Field(description="pixel L2 distance between the generation and it")


class NearCopyPublic(BaseModel):
    nearest: list[NearestWork] = Field(description="the generation's nearest training works, nearest first")
    ratio: float = Field(description="the nearest distance over the median distance of a training image to "
                         "its nearest other training image")
    threshold: float = Field(description="ratio at or below which the generation is a near-copy")
    near_copy: bool = Field(description="ratio <= threshold")
    confirmed: bool | None = Field(description="near-copies: whether removing the members trained on the "
                                   "nearest work (exact counterfactual) moves the generation away from it")
    moved_away: float | None = Field(description="that counterfactual's d(cf, x) - d(f, x)")


class AttributionPublic(BaseModel):
    id: int = Field(description="attribution id")
    generation_id: int = Field(description="the generation attributed")
    method: str = Field(description="synthetic or exact")
    metric: str = Field(description="l2 or lpips")
    score: Literal["influence", "resemblance"] = Field(description="the score that ranks the entries")
    top_k: int = Field(description="entries reported")
    verify_top_k: int = Field(description="how many of the synthetic top were re-ranked by exact "
                              "counterfactuals")
    status: Literal["pending", "running", "succeeded", "failed"] = Field(description="life cycle state")
    attributable: bool | None = Field(None, description="whether a work is named (the selective test, "
                                      "see significance); null when not measured (method=exact, or older "
                                      "attributions). Not attributable is an answer: the ranking stands, but "
                                      "no single work explains the generation")
    significance: SignificancePublic | None = Field(None, description="how attributable was decided")
    near_copy: NearCopyPublic | None = Field(None, description="the copy check: is the generation a "
                                             "near-copy of a training work")
    causal: CausalPublic | None = Field(None, description="the authors' causal measures, from the exact "
                                        "counterfactuals (null for older attributions)")
    agreement: dict[str, float] | None = Field(description="synthetic vs exact on the verified entries")
    created_at: Time = Field(description="when it was created (UTC)")
    finished_at: Time | None = Field(description="when it finished (UTC), if it has")
    entries: list[EntryPublic] = Field(description="ranked training works, first by the score first")


class BatchCreate(_SeedsIn):
    """Like GenerateCreate, but up to max_batch_seeds seeds, optionally attributed."""

    attribute: AttributeOptions | None = Field(None, description="also attribute every sample")


class BatchAccepted(BaseModel):
    batch_id: int = Field(description="the batch: GET /batches/{batch_id}")
    total: int = Field(description="number of items (all pages)")
    job_ids: list[str] = Field(
        description="jobs created by this request (none when everything was already done or queued)"
    )


class BatchPublic(BaseModel):
    id: int = Field(description="batch id")
    ensemble_id: int = Field(description="the ensemble that sampled it")
    steps: int = Field(description="sampling steps")
    total: int = Field(description="samples in the batch")
    attribute: dict[str, Any] | None = Field(description="the attribution options of the batch, if any")
    jobs: dict[str, int] = Field(description="job count by status")
    progress: float = Field(description="0..1 over all jobs of the batch")
    done: bool = Field(description="every job finished (succeeded or failed)")
    generation_ids: list[int] = Field(description="one generation per seed, in seed order")
    attribution_ids: list[int] = Field(
        description="one attribution per generation (batches with attribute), in the same order"
    )
    created_at: Time = Field(description="when it was created (UTC)")


class OptOutCreate(_In):
    reason: str = Field("", max_length=2000, description="why the work is withdrawn (kept with the opt-out)")


class OptOutEnsemblePublic(BaseModel):
    lineage_id: int = Field(description="the ensemble lineage (its first version's id)")
    state: Literal["masked", "retraining", "restored"] = Field(
        description="masked: served without the work's members; retraining: those members are being "
        "retrained without it; restored: a retrained version serves every member again")
    members: list[int] = Field(description="the members that trained on the work, S(x): dropped at once, "
                               "then retrained")
    trained_version_id: int = Field(description="the version that served when the work was withdrawn")
    masked_version_id: int = Field(description="the version that served at once without the work's members")
    restored_version_id: int | None = Field(description="the retrained version, once restored")
    serving_version_id: int | None = Field(description="the version of this lineage serving now")
    retrain_job_id: str | None = Field(description="the retrain job: GET /jobs/{id} (operators)")
    restored_at: Time | None = Field(description="when the retrained version took over (UTC)")


class OptOutPublic(BaseModel):
    id: int = Field(description="opt-out id: GET /opt-outs/{id}")
    work_id: int = Field(description="the withdrawn work")
    state: Literal["masked", "retraining", "restored"] = Field(
        description="the least advanced state over the ensembles that trained on the work (restored "
        "when none did)")
    reason: str = Field(description="why the work was withdrawn")
    requested_by: Literal["holder", "operator"] = Field(description="who withdrew it")
    created_at: Time = Field(description="when it was withdrawn (UTC): nothing generated after depends on it")
    ensembles: list[OptOutEnsemblePublic] = Field(description="what it did to each ensemble lineage")


class WorkPublic(BaseModel):
    id: int = Field(description="work (training item) id")
    dataset_id: int = Field(description="the dataset the work belongs to")
    external_ref: str = Field(description="the work's reference in its dataset (file name, index)")
    label: int | None = Field(description="the work's class label, if the dataset has labels")
    sha256: str = Field(description="SHA-256 of the work's pixels (uint8 C,H,W)")
    image_url: str = Field(description="the work's image (PNG)")
    opt_out: OptOutPublic | None = Field(None, description="its opt-out (POST /works/{id}/opt-out), if "
                                         "withdrawn")


class _Page(BaseModel):
    """What every page says besides its items."""

    total: int = Field(description="number of items (all pages)")
    offset: int = Field(description="items skipped")
    limit: int = Field(description="page size")


class WorkPage(_Page):
    items: list[WorkPublic] = Field(description="this page")


class InfluencePublic(BaseModel):
    attribution_id: int = Field(
        description="the attribution: GET /attributions/{attribution_id} once the job succeeded"
    )
    generation_id: int = Field(description="the generation attributed")
    ensemble_id: int = Field(description="the ensemble that sampled it")
    seed: int = Field(description="noise seed: with the ensemble and steps it fixes the image")
    rank: int = Field(description="1 = first by the attribution's score")
    top_k: int = Field(description="entries reported")
    method: str = Field(description="synthetic or exact")
    metric: str = Field(description="l2 or lpips")
    score_name: Literal["influence", "resemblance"] = Field(description="the score that ranked it")
    score: float = Field(description="this work's value of that score (GET /attributions/{id} has both)")
    exact_score: float | None = Field(description="its exact value, where verified")
    p_value: float | None = Field(None, description="its decoy p-value (the one that decides): how often "
                                  "removing random members moves the generation away from this work as much")
    attributable: bool | None = Field(None, description="whether the attribution named a work at all (its "
                                      "top work significant); null when not measured")
    near_copy: bool = Field(False, description="the generation is a near-copy of this work (the copy check)")
    generation_url: str = Field(description="the generated image (PNG)")
    counterfactual_url: str = Field(description="the generation without this work (PNG)")
    created_at: Time = Field(description="when it was created (UTC)")


class InfluencePage(_Page):
    work_id: int = Field(description="the work")
    items: list[InfluencePublic] = Field(description="this page")


# ------------------------------------------------------------------------ validation
PresetName = Literal["tiny", "digits", "mnist", "paper"]  # models.ensemble.PRESETS (a test keeps them equal)
ClassifierName = ClassifierKind


class TrainOptions(_In):
    """How the validation trains its ensemble (every field optional: the CLI's defaults)."""

    dataset_id: int | None = Field(None, ge=1, le=MAX_ID, description="train on this registered dataset's "
                                   "data (default: the embedded digits)")
    subset: int | None = Field(None, ge=2, description="a random subset of this many items (copies: "
                               "default 300; not with a dataset that is itself a subset)")
    subset_seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seed of that subset")
    preset: PresetName | None = Field(None, description="network preset (default digits)")
    n: int | None = Field(None, ge=2, le=62, description="ensemble size (default 16); codes have weight n/2")
    train_steps: int | None = Field(None, ge=1, description="training steps (default the preset's); at "
                                    "most max_validation_train_steps")
    batch_size: int | None = Field(None, ge=1, le=4096, description="items per member per step")
    lr: float | None = Field(None, gt=0, le=1, description="Adam learning rate")


EXPERIMENT = "which experiment (classes, fidelity, copies, canaries)"


class _ValidationIn(_In):
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of codes, training, classifier and subsets")
    samples: int | None = Field(None, ge=1, description="generated samples (default classes 1000, "
                                "fidelity 16, copies 64, canaries 64); at most max_validation_samples")
    seed_start: int = Field(0, ge=0, le=MAX_SEED_START, description="first sample seed")
    steps: int | None = Field(None, ge=1, description="sampling steps (default the ensemble's T); at most "
                              "max_steps")
    train: TrainOptions | None = Field(None, description="how to train the experiment's ensemble")

    @model_validator(mode="after")
    def _ensemble_or_train(self) -> _ValidationIn:
        if getattr(self, "ensemble_id", None) is not None and self.train is not None:
            raise ValueError("give ensemble_id (use that ensemble as trained) or train, not both")
        return self


_ENSEMBLE_OR_TRAIN: JsonDict = {"not": {"required": ["ensemble_id", "train"]}}


class ClassesValidation(_ValidationIn):
    """The class-ablation control (paper Figure 1c): sources are whole classes; trains its ensemble."""

    experiment: Literal["classes"] = Field(description=EXPERIMENT)
    exclude_classes: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^,\s]+$")]] | None = (
        Field(None, max_length=100, description="leave these classes out (paper Figure 1b: ['5', '7', '9'])"))
    classifier: ClassifierName | None = Field(None, description="the classifier (default svc)")
    codes: Literal["balanced", "random"] | None = Field(None, description="class codes (default balanced: "
                                                        "Hadamard rows, n a power of two)")
    min_confidence: float | None = Field(None, gt=0, le=1, description="a 'confident' label (default 0.9)")
    lpips: bool | None = Field(None, description="false: Euclidean only (default: LPIPS too where its "
                               "backbone weights are installed; the report says)")


class FidelityValidation(_ValidationIn):
    """Synthetic vs exact influence, and a pixel-similarity baseline."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ENSEMBLE_OR_TRAIN)
    experiment: Literal["fidelity"] = Field(description=EXPERIMENT)
    ensemble_id: int | None = Field(None, ge=1, le=MAX_ID, description="a registered ensemble, as trained "
                                    "(not with train); default: train a fresh one")
    sources: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        None, description="a random N sources per sample plus the top candidates, or 'all' (default 300)")
    top: int | None = Field(None, ge=1, le=1000, description="top candidates added (default 50)")
    recall_k: int | None = Field(None, ge=1, le=1000, description="k of recall@k (default 10)")
    broken: bool | None = Field(None, description="CONTROL: random synthetic scores (must fail the targets)")


class CopiesValidation(_ValidationIn):
    """Copy detection on a small training set (paper Figure 2a)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ENSEMBLE_OR_TRAIN)
    experiment: Literal["copies"] = Field(description=EXPERIMENT)
    ensemble_id: int | None = Field(None, ge=1, le=MAX_ID, description="a registered ensemble, as trained "
                                    "(not with train); default: train a fresh one")
    copy_ratio: float | None = Field(None, gt=0, le=10, description="near-copy threshold ratio (default 0.5)")
    top: int | None = Field(None, ge=1, le=1000, description="synthetic top-K kept per sample (default 5)")
    exact: Literal["none", "copies", "all"] | None = Field(
        None, description="also ablate every source exactly for the near-copies (or all samples), to tell "
                          "the estimate's misses from the model's (default none; samples x sources runs)")
    verify_top_k: int | None = Field(None, ge=0, le=1000, description="the service's attribution: synthetic "
                                     "top K re-ranked by exact counterfactuals (default 50)")
    decoys: int | None = Field(None, ge=0, le=100_000, description="decoy codes of the p-values (default "
                               "10000)")
    exact_decoys: int | None = Field(None, ge=0, le=1000, description="decoys also run exactly, for exact "
                                     "p-values (default 0)")
    far_draws: int | None = Field(None, ge=1, le=100, description="random works dropped per sample for the "
                                  "false attribution rate's u_r (default 2)")


class CanariesValidation(_ValidationIn):
    """A benchmark whose truth is known: a few works made distinctive and duplicated in their members'
    splits; samples near one must name it, others must not. Trains its own ensemble."""

    experiment: Literal["canaries"] = Field(description=EXPERIMENT)
    canaries: int | None = Field(None, ge=1, le=10_000, description="works made canaries (default 10)")
    duplicates: int | None = Field(None, ge=1, le=1000, description="times each canary is listed in its "
                                   "members' splits (default 20)")
    canary_seed: int | None = Field(None, ge=0, le=2**31 - 1, description="which works become canaries")
    copy_ratio: float | None = Field(None, gt=0, le=10, description="near a canary: nearest training image "
                                     "is the canary within this ratio (default 0.5)")
    verify_top_k: int | None = Field(None, ge=0, le=1000, description="synthetic top K re-ranked by exact "
                                     "counterfactuals (default 50)")
    decoys: int | None = Field(None, ge=0, le=100_000, description="decoy codes of the p-values (default "
                               "10000)")
    far_draws: int | None = Field(None, ge=1, le=100, description="random works dropped per sample for "
                                  "FAR's u_r (default 2)")


ValidationRequest = ClassesValidation | FidelityValidation | CopiesValidation | CanariesValidation
ValidationCreate = Annotated[ValidationRequest, Field(discriminator="experiment")]
"""One experiment of `attrib validate`: a worker runs its config as the CLI runs the same flags."""


def validation_config(body: ValidationRequest, ensemble: Mapping[str, Any]) -> AnyConfig:
    """The experiment's config of a request. ``ensemble``: what the route resolved ensemble_id or
    train.dataset_id to (``checkpoint``, or ``data``, ``subset``, ``subset_seed``): paths never
    come from a request."""
    own = body.model_dump(exclude_unset=True, exclude={"experiment", "ensemble_id", "train"})
    train = {} if body.train is None else body.train.model_dump(exclude_unset=True, exclude={"dataset_id"})
    return CONFIGS[body.experiment].from_options({**ensemble, **own, **train})


def validation_flags(config: AnyConfig) -> list[str]:
    """The `attrib validate` flags that give ``config`` (its options as given: ``--name value``,
    booleans as switches, LPIPS off as --no-lpips, lists comma-separated)."""
    out: list[str] = []
    for name, value in config.options().items():
        flag = "--" + name.replace("_", "-")
        if name == "lpips":
            out += [] if value else ["--no-lpips"]
        elif isinstance(value, bool):
            out += [flag] if value else []
        elif isinstance(value, tuple):
            out += [flag, ",".join(value)] if value else []
        else:
            out += [flag, str(value)]
    return out


class ValidationAccepted(BaseModel):
    job_id: str = Field(description="the validation: GET /validations/{job_id} (or GET /jobs/{job_id})")
    experiment: str = Field(description="classes, fidelity, copies or canaries")
    url: str = Field(description="where its report will be")


class ValidationSummary(BaseModel):
    job_id: str = Field(description="the job that runs it")
    url: str = Field(description="its report: GET /validations/{job_id}")
    experiment: str = Field(description="classes, fidelity, copies or canaries")
    status: Literal["queued", "running", "succeeded", "failed"] = Field(description="life cycle state")
    progress: float = Field(description="0..1")
    passed: bool | None = Field(description="whether every target of the experiment was met (once done)")
    created_at: Time = Field(description="when it was requested (UTC)")
    finished_at: Time | None = Field(description="when it finished (UTC), if it has")


class ValidationPage(_Page):
    items: list[ValidationSummary] = Field(description="this page, newest first")


class ValidationPublic(ValidationSummary):
    request: dict[str, Any] = Field(description="the request as given")
    options: list[str] = Field(description="the `attrib validate` flags of its config (the CLI equivalent)")
    error: str | None = Field(description="why it failed, if it did")
    report: dict[str, Any] | None = Field(description="the report (what the CLI writes to report.json)")
    figures: dict[str, str] = Field(description="figure name -> URL of its PNG")


# ---------------------------------------------------------------------------- shares
class OwnerSharePublic(BaseModel):
    owner_id: int | None = Field(description="the rights holder; null: the works that have none")
    owner_name: str | None = Field(description="that rights holder's name")
    share: float = Field(description="0..1: the owner's part of the attribution's positive scores "
                         "(exact where verified); the shares of an attribution sum to 1")
    works: int = Field(description="the owner's works in the ranking")


class AttributionSharesPublic(BaseModel):
    attribution_id: int = Field(description="the attribution")
    attributable: bool = Field(description="false: no ranked work has a positive score, so nothing is "
                               "attributed and there are no shares")
    status: Literal["attributed", "unattributed"] = Field(description="the same, in words")
    shares: list[OwnerSharePublic] = Field(description="one line per owner, largest share first")


class HolderSharePublic(BaseModel):
    attribution_id: int = Field(description="the attribution counted for that generation (its newest)")
    generation_id: int = Field(description="the generation attributed")
    finished_at: Time = Field(description="when the attribution finished (UTC)")
    share: float = Field(description="0..1: your share of that attribution")
    works: int = Field(description="your works in its ranking")


class HolderSharePage(_Page):
    items: list[HolderSharePublic] = Field(description="this page, newest first")


class DayTotalPublic(BaseModel):
    day: str = Field(description="the UTC day (YYYY-MM-DD)")
    total: float = Field(description="your shares summed over the day's attributed generations")
    attributable: int = Field(description="generations attributed that day (every holder's)")
    share: float = Field(description="0..1: total / attributable, your share of that day")


class HolderDays(BaseModel):
    days: list[DayTotalPublic] = Field(description="one per day, oldest first")


class OwnerCounterfactualAccepted(BaseModel):
    job_id: str = Field(description="the job computing it: poll GET /jobs/{job_id}")
    members_dropped: int = Field(description="members trained on at least one of the owner's works")
    members_left: int = Field(description="members the counterfactual samples with")
    image_url: str = Field(description="the counterfactual's PNG, once the job succeeded")
