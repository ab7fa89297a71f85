"""The experiments' configs: how an experiment gets its ensemble (a checkpoint, or training
options) and each experiment's own options, frozen pydantic models whose field names are the
`attrib validate` flags. Nothing here needs torch: the API validates a POST /validations body
with these, and its processes start without loading the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
)

from models.scores import DECOYS

ClassifierKind = Literal["svc", "logreg", "mlp", "cnn"]
CLASSIFIERS: tuple[str, ...] = get_args(ClassifierKind)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Checkpoint(Frozen):
    """Use a trained ensemble as it is. Its data is reloaded from the spec it records, or from
    ``data`` (a models.data.load_dataset spec) when given."""

    checkpoint: str
    data: str | None = None


class Training(Frozen):
    """Train a fresh ensemble into OUT/ensemble.pt; None takes the preset's value (k: n/2)."""

    data: str = "digits"
    subset: Annotated[int, Field(ge=2)] | None = None
    subset_seed: NonNegativeInt = 0
    preset: str = "digits"
    n: Annotated[int, Field(ge=2)] = 16
    k: PositiveInt | None = None
    train_steps: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    lr: PositiveFloat | None = None


ENSEMBLE_OPTIONS = ("checkpoint", "data", *(name for name in Training.model_fields if name != "data"))
"""The options that say how an experiment gets its ensemble (Checkpoint's and Training's fields)."""


class ExperimentConfig(Frozen):
    """What every experiment takes. Field names are those of the `attrib validate` flags."""

    STAGES: ClassVar[tuple[str, ...]] = ()
    """The progress stages of the experiment after training."""

    ensemble: Checkpoint | Training = Training()
    seed: NonNegativeInt = 0
    samples: PositiveInt = 16
    seed_start: NonNegativeInt = 0
    steps: PositiveInt | None = None
    chunk: PositiveInt = 256

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """The config of flat options named like the flags: ``checkpoint`` (and ``data``), or the
        training options, beside the experiment's own. None means "not given" (the default);
        with a checkpoint, training options are ignored. Values are validated (and strings
        converted) as pydantic does: ValidationError when one is not of its field's type."""
        given = {name: value for name, value in options.items() if value is not None}
        source = {name: given.pop(name) for name in ENSEMBLE_OPTIONS if name in given}
        if "checkpoint" in source:
            given["ensemble"] = Checkpoint.model_validate(
                {name: source[name] for name in ("checkpoint", "data") if name in source})
        elif source:
            default = cls.model_fields["ensemble"].default
            given["ensemble"] = Training.model_validate({**default.model_dump(exclude_unset=True), **source})
        return cls.model_validate(given)

    def options(self) -> dict[str, Any]:
        """The options this config was given, as ``from_options`` takes them: the checkpoint or
        data first, then the experiment's own, then the other training options (each by name)."""
        own = {name: getattr(self, name)
               for name in sorted(self.model_fields_set - {"ensemble", "experiment"})}
        if "ensemble" not in self.model_fields_set:
            return own
        source = {name: getattr(self.ensemble, name) for name in sorted(self.ensemble.model_fields_set)}
        first: dict[str, Any] = {name: source.pop(name) for name in ("checkpoint", "data") if name in source}
        return {**first, **own, **source}

    def stages(self) -> tuple[str, ...]:
        """The progress stages ``run`` reports, in order ("train" first when it trains)."""
        return (() if isinstance(self.ensemble, Checkpoint) else ("train",)) + self.STAGES


class ClassesConfig(ExperimentConfig):
    """`attrib validate classes`: what to train (class granularity) and how to classify, sample
    and compare."""

    STAGES: ClassVar[tuple[str, ...]] = ("sample", "exact")

    experiment: Literal["classes"] = "classes"
    samples: PositiveInt = 1000
    codes: Literal["balanced", "random"] = "balanced"
    exclude_classes: tuple[str, ...] = ()
    classifier: ClassifierKind = "svc"
    min_confidence: Annotated[float, Field(gt=0, le=1)] = 0.9
    lpips: bool = True
    lpips_random_trunk: bool = False
    grid_rows: PositiveInt = 8
    raw: bool = False

    @field_validator("exclude_classes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """The flag's form "5,7,9" is ("5", "7", "9")."""
        if isinstance(value, str):
            return tuple(c.strip() for c in value.split(",") if c.strip())
        return value


class FidelityConfig(ExperimentConfig):
    """`attrib validate fidelity`: which sources to ablate exactly for each sample, and k."""

    STAGES: ClassVar[tuple[str, ...]] = ("jacobian", "exact")

    experiment: Literal["fidelity"] = "fidelity"
    granularity: Literal["item", "owner", "class"] = "item"
    sources: PositiveInt | Literal["all"] = 300
    top: PositiveInt = 50
    recall_k: PositiveInt = 10
    broken: bool = False


class CopiesConfig(ExperimentConfig):
    """`attrib validate copies`: a small training set (300 items unless told), what counts as a
    near-copy, and whether to ablate every source exactly for some samples."""

    STAGES: ClassVar[tuple[str, ...]] = ("jacobian", "trust", "exact")

    ensemble: Checkpoint | Training = Training(subset=300)
    samples: PositiveInt = 64
    experiment: Literal["copies"] = "copies"
    copy_ratio: PositiveFloat = 0.5
    top: PositiveInt = 5
    grid: PositiveInt = 48
    exact: Literal["none", "copies", "all"] = "none"
    verify_top_k: NonNegativeInt = 50
    decoys: NonNegativeInt = DECOYS
    exact_decoys: NonNegativeInt = 0
    far_draws: PositiveInt = 2

    def stages(self) -> tuple[str, ...]:
        stages = super().stages()
        return stages if self.exact != "none" else stages[:-1]


class CanariesConfig(ExperimentConfig):
    """`attrib validate canaries`: a benchmark whose truth is known. ``canaries`` works of the
    training set (chosen by ``canary_seed``) are made distinctive (their image inverted) and listed
    ``duplicates`` times in their members' splits (heavily duplicated works are what diffusion
    models memorise); the rest stay ordinary. It trains its own ensemble (the canaries are part of
    its training data)."""

    STAGES: ClassVar[tuple[str, ...]] = ("jacobian", "trust", "causal")

    experiment: Literal["canaries"] = "canaries"
    ensemble: Checkpoint | Training = Training(subset=300, train_steps=3000)
    samples: PositiveInt = 64
    canaries: PositiveInt = 10
    duplicates: PositiveInt = 20
    canary_seed: NonNegativeInt = 0
    copy_ratio: PositiveFloat = 0.5
    verify_top_k: NonNegativeInt = 50
    decoys: NonNegativeInt = DECOYS
    far_draws: PositiveInt = 2


AnyConfig = ClassesConfig | FidelityConfig | CopiesConfig | CanariesConfig
Config = Annotated[AnyConfig, Field(discriminator="experiment")]
"""The config of any experiment, told apart by its ``experiment`` field (for pydantic)."""

CONFIGS: dict[str, type[AnyConfig]] = {"classes": ClassesConfig, "fidelity": FidelityConfig,
                                              "copies": CopiesConfig, "canaries": CanariesConfig}
