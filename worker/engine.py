"""What a job does: read its rows, call models/, write results. No Celery here.

Each worker process keeps its loaded ensembles (and their single-member views, for exact
counterfactuals) in an ``EngineCache``. Every write is idempotent: a generation already
done is skipped, an attribution's entries are replaced in the same transaction that marks
the job succeeded, images are inserted only when absent.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

import experiments
from app import jobs
from app.db import Database
from app.orm import (
    Attribution,
    AttributionEntry,
    EnsembleRow,
    Generation,
    Image,
    Job,
    OptOut,
    SourceCode,
    utcnow,
)
from app.registry import RegistryError, stored_dataset
from app.settings import Settings
from app.unlearning import OptOutError, RetrainOptions, retrain_lineage
from experiments import CONFIGS, AnyConfig
from experiments.common import ExperimentError
from experiments.configs import ENSEMBLE_OPTIONS
from models.ablation import gram, jacobian, measurable
from models.attribute import (
    AttributionConfig,
    SampleAttribution,
    Significance,
    attribute_exact,
    conclude,
    copy_checks,
    rank_sources,
    verify,
)
from models.causality import causal_measures
from models.codes import mask_bits
from models.copies import CopyCheck, nearest_neighbour_median
from models.data import DatasetError
from models.distances import LPIPSMetric, l2_distance, load_lpips
from models.ensemble import Ensemble, resolve_device
from models.images import png_bytes
from models.resemblance import squared_norms
from models.sampler import exact_counterfactuals, make_tape, sample, served_weights
from models.unet import WideUNet

log = logging.getLogger(__name__)
Progress = Callable[[float], None]


class JobError(Exception):
    """A permanent failure with a message for the user (the job fails, no retry)."""


@dataclass
class LoadedEnsemble:
    """One ensemble version: its network, and the members it serves (an opt-out drops some)."""

    row_id: int
    ens: Ensemble
    members: list[WideUNet]
    item_of_source: np.ndarray  # (S,) training_item.id of each code-book source
    source_of_item: dict[int, int]  # training_item.id -> source index
    served: torch.Tensor | None = None  # (n,) bits of the served members; None: all of them
    images: torch.Tensor | None = None  # (N, C, H, W) its training images, loaded when first needed
    nn_median: float | None = None  # their median nearest-neighbour distance (the copy check's scale)
    norms_sq: torch.Tensor | None = None  # their squared norms (every resemblance pass needs them)

    @property
    def weights(self) -> torch.Tensor | None:
        """The member weights it samples with: m/|m| (None: the full ensemble's 1/n)."""
        return None if self.served is None else served_weights(self.served)

    def rankable(self, withdrawn_items: set[int]) -> torch.Tensor:
        """(S',) the sources a new attribution may rank: not withdrawn, and leaving a served member
        when ablated (a source whose code covers every served member cannot be ablated)."""
        keep = np.array([int(item) not in withdrawn_items for item in self.item_of_source], dtype=bool)
        if self.served is not None:
            keep &= measurable(torch.from_numpy(self.ens.codebook.bits()), self.served).numpy()
        return torch.from_numpy(np.flatnonzero(keep))


class EngineCache:
    """Loaded ensembles of this worker process, by ensemble id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self._ensembles: dict[int, LoadedEnsemble] = {}
        self._lpips: LPIPSMetric | None = None

    def ensemble(self, s: Session, ensemble_id: int) -> LoadedEnsemble:
        hit = self._ensembles.get(ensemble_id)
        if hit is not None:
            return hit
        row = s.get(EnsembleRow, ensemble_id)
        if row is None:
            raise JobError(f"ensemble {ensemble_id} does not exist")
        try:
            ens = Ensemble.load(row.checkpoint).for_inference(self.device)
        except (FileNotFoundError, ValueError) as exc:
            raise JobError(f"ensemble {ensemble_id}: {exc}") from exc
        codes = s.execute(select(SourceCode.source_index, SourceCode.training_item_id, SourceCode.code)
                          .where(SourceCode.ensemble_id == ensemble_id)
                          .order_by(SourceCode.source_index)).all()
        book_codes = ens.codebook.codes
        if len(codes) != len(book_codes) or any(int(c) != int(b) for (_, _, c), b in zip(codes, book_codes,
                                                                                          strict=True)):
            raise JobError(f"ensemble {ensemble_id}: stored codes do not match checkpoint {row.checkpoint}")
        items = np.array([it if it is not None else -1 for _, it, _ in codes], dtype=np.int64)
        members = [ens.net.member(i) for i in range(ens.n)]
        served = None
        if row.served_members != (1 << ens.n) - 1:
            served = torch.from_numpy(mask_bits(row.served_members, ens.n).astype(np.int64))
        loaded = LoadedEnsemble(row.id, ens, members, items,
                                {int(it): i for i, it in enumerate(items) if it >= 0}, served)
        self._ensembles[ensemble_id] = loaded
        return loaded

    def training_images(self, s: Session, le: LoadedEnsemble) -> torch.Tensor:
        """The ensemble's training images in item order (resemblance, p-values, the copy check), read
        back from the works the service imported (checked against the data's fingerprint)."""
        if le.images is None:
            row = s.get(EnsembleRow, le.row_id)
            assert row is not None
            try:
                ds = stored_dataset(s, row.dataset_id)
            except RegistryError as exc:
                raise JobError(f"ensemble {le.row_id}: {exc}") from exc
            if ds.fingerprint() != le.ens.dataset.fingerprint:
                raise JobError(f"ensemble {le.row_id}: its stored works are not the data it was trained on")
            le.images = ds.to_tensor()
            le.nn_median = nearest_neighbour_median(le.images)
            le.norms_sq = squared_norms(le.images)
        return le.images

    def lpips(self) -> LPIPSMetric:
        if self._lpips is None:
            try:
                self._lpips = load_lpips(device=self.device)
            except Exception as exc:  # LPIPSUnavailable and friends: permanent, explained
                raise JobError(f"metric 'lpips' is unavailable on this worker: {exc}") from exc
        return self._lpips


# --------------------------------------------------------------------------- storage
def put_image(s: Session, png: bytes, width: int, height: int) -> str:
    """Store a PNG once; returns its SHA-256."""
    sha = hashlib.sha256(png).hexdigest()
    if s.get(Image, sha) is None:
        s.add(Image(sha256=sha, png=png, width=width, height=height))
        s.flush()
    return sha


def _f32(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()


def _store_sample(s: Session, gen: Generation, x: torch.Tensor) -> None:
    """x: (C, H, W) in [-1, 1]."""
    png = png_bytes(x)
    gen.image_sha = put_image(s, png, x.shape[-1], x.shape[-2])
    gen.sample = _f32(x)
    gen.status = "done"
    gen.finished_at = utcnow()


def _sample_of(gen: Generation, shape: tuple[int, int, int]) -> torch.Tensor:
    assert gen.sample is not None
    return torch.from_numpy(np.frombuffer(gen.sample, dtype=np.float32).copy()).reshape(shape)


# --------------------------------------------------------------------------- generate
def run_generate(db: Database, cache: EngineCache, job: Job, progress: Progress) -> dict[str, Any]:
    """Sample every pending generation of the job, ``generate_chunk`` seeds per pass."""
    ids = [int(i) for i in job.payload["generation_ids"]]
    with db.session() as s:
        gens = [g for g in s.scalars(select(Generation).where(Generation.id.in_(ids))) if g.status != "done"]
        todo = [(g.id, g.ensemble_id, g.seed, g.steps) for g in gens]
    chunk = cache.settings.generate_chunk
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for gid, eid, seed, steps in todo:
        groups.setdefault((eid, steps), []).append((gid, seed))
    done = len(ids) - len(todo)
    for (eid, steps), members in groups.items():
        with db.session() as s:
            le = cache.ensemble(s, eid)
        for lo in range(0, len(members), chunk):
            part = members[lo : lo + chunk]
            tape = make_tape([seed for _, seed in part], le.ens.shape, steps)
            x = sample(le.ens.net, le.ens.schedule, tape, le.weights)
            with db.session() as s:
                for (gid, _), x_i in zip(part, x, strict=True):
                    gen = s.get(Generation, gid)
                    if gen is not None and gen.status != "done":
                        _store_sample(s, gen, x_i)
            done += len(part)
            progress(done / max(1, len(ids)))
    result = {"generation_ids": ids, "sampled": len(todo)}
    with db.session() as s:
        jobs.finish(s, job.id, result)
    return result


# -------------------------------------------------------------------------- attribute
def _ensure_sample(db: Database, le: LoadedEnsemble, gen_id: int) -> tuple[Generation, torch.Tensor]:
    with db.session() as s:
        gen = s.get(Generation, gen_id)
        assert gen is not None
        if gen.status != "done":
            tape = make_tape([gen.seed], le.ens.shape, gen.steps)
            x = sample(le.ens.net, le.ens.schedule, tape, le.weights)[0]
            _store_sample(s, gen, x)
        return gen, _sample_of(gen, le.ens.shape)


def _ensure_jacobian(db: Database, le: LoadedEnsemble, gen: Generation) -> torch.Tensor:
    """J: (1, D, n) float32, computed once per generation and stored with its Gram matrix."""
    D, n = int(np.prod(le.ens.shape)), le.ens.n
    if gen.jacobian is not None:
        return torch.from_numpy(np.frombuffer(gen.jacobian, dtype=np.float32).copy()).reshape(1, D, n)
    _, J = jacobian(le.ens.net, le.ens.schedule, make_tape([gen.seed], le.ens.shape, gen.steps), le.weights)
    J = J.cpu().to(torch.float32)
    with db.session() as s:
        row = s.get(Generation, gen.id)
        assert row is not None
        row.jacobian = J.numpy().tobytes()
        row.gram = gram(J)[0].numpy().tobytes()
    return J


def _attribution_and_ensemble(s: Session, cache: EngineCache, attribution_id: int
                              ) -> tuple[Attribution, LoadedEnsemble]:
    """An attribution and the loaded ensemble (version) of its generation; JobError if it is gone."""
    att = s.get(Attribution, attribution_id)
    if att is None:
        raise JobError(f"attribution {attribution_id} does not exist")
    gen = s.get(Generation, att.generation_id)
    assert gen is not None
    return att, cache.ensemble(s, gen.ensemble_id)


def run_attribute(db: Database, cache: EngineCache, job: Job, progress: Progress) -> dict[str, Any]:
    attribution_id = int(job.payload["attribution_id"])
    with db.session() as s:
        att, le = _attribution_and_ensemble(s, cache, attribution_id)
        method, metric, score = att.method, att.metric, att.score
        top_k, verify_k = att.top_k, att.verify_top_k
        att.status = "running"
        withdrawn = set(s.scalars(select(OptOut.training_item_id)))
    sources = le.rankable(withdrawn)  # withdrawn works leave new rankings
    S = len(sources)
    if S == 0:
        raise JobError(f"ensemble {le.row_id} has no training work left to rank")
    top_k, verify_k = min(top_k, S), min(verify_k, S)
    settings = cache.settings
    try:
        cfg = AttributionConfig(top_k=top_k, metric=metric, rerank=max(top_k, settings.lpips_rerank),
                                verify_top_k=verify_k, score=score, decoys=settings.decoys,
                                alpha=settings.attributable_alpha,
                                exact_decoys=min(settings.exact_decoys, settings.decoys))
    except ValueError as exc:
        raise JobError(f"attribution {attribution_id}: {exc}") from exc
    lp = cache.lpips() if metric == "lpips" else None
    with db.session() as s:
        images = cache.training_images(s, le)
    gen, f = _ensure_sample(db, le, att.generation_id)
    progress(0.1)
    tape = make_tape([gen.seed], le.ens.shape, gen.steps)
    f = f.to(cache.device)
    if method == "exact":
        res = attribute_exact(le.ens, tape, f, cfg, lp, le.members,
                              progress=lambda p: progress(0.1 + 0.85 * p), served=le.served, sources=sources,
                              images=images)
    else:
        J = _ensure_jacobian(db, le, gen).to(cache.device)
        progress(0.4)
        res = rank_sources(le.ens, [gen.seed], f[None], J, cfg, lp, served=le.served, sources=sources,
                           images=images, norms_sq=le.norms_sq)[0]
        progress(0.5)
        if verify_k:
            verify(le.ens, tape, [res], cfg, lp, le.members, served=le.served, images=images)
        conclude(res, cfg)
    progress(0.9)
    [check] = copy_checks(le.ens, tape, [res], images, nn_median=le.nn_median, ratio=settings.copy_ratio,
                          served=le.served, sources=sources, members=le.members)
    progress(0.95)
    return _write_attribution(db, le, attribution_id, job.id, res, cfg, check, images)


def _item_of_index(le: LoadedEnsemble, index: int) -> int:
    """The training item row id of the code book's item ``index``."""
    return int(le.item_of_source[le.ens.codebook.item_source[int(index)]])


def _significance_json(le: LoadedEnsemble, sig: Significance) -> dict[str, Any]:
    """``Significance.to_json`` with the sources it names as training item ids."""
    out = sig.to_json()
    out["candidates"] = [{"training_item_id": int(le.item_of_source[c.source]), "distance": c.distance,
                          "p_value": c.p} for c in sig.candidates]
    out.pop("named_source")
    out["named_training_item_id"] = None if sig.named is None else int(le.item_of_source[sig.named])
    return out


def _write_attribution(db: Database, le: LoadedEnsemble, attribution_id: int, job_id: str,
                       res: SampleAttribution, cfg: AttributionConfig, check: CopyCheck,
                       images: torch.Tensor) -> dict[str, Any]:
    """Replace the entries and mark attribution and job done, in one transaction."""
    exact = res.exact_counterfactuals
    sig = res.significance
    with db.session() as s:
        s.execute(delete(AttributionEntry).where(AttributionEntry.attribution_id == attribution_id))
        for rank, e in enumerate(res.ranking, 1):
            item = int(le.item_of_source[e.source])
            if item < 0:
                raise JobError(f"source {e.source} of ensemble {le.row_id} has no training item")
            cf_sha = None
            if exact is not None and rank - 1 < exact.shape[0]:
                x = exact[rank - 1]
                cf_sha = put_image(s, png_bytes(x), x.shape[-1], x.shape[-2])
            s.add(AttributionEntry(attribution_id=attribution_id, training_item_id=item, rank=rank,
                                   score=e.value(cfg.score, cfg.metric),
                                   exact_score=e.exact_value(cfg.score, cfg.metric),
                                   influence=e.score(cfg.metric), exact_influence=e.exact_score(cfg.metric),
                                   resemblance=e.resemblance, exact_resemblance=e.exact_resemblance,
                                   p_value=e.p_value, exact_p_value=e.exact_p_value,
                                   significant=None if sig is None else sig.names(e),
                                   counterfactual_sha=cf_sha))
        att = s.get(Attribution, attribution_id)
        assert att is not None
        # JSON has no NaN (PostgreSQL's json refuses it: the whole attribution failed there): an
        # undefined value (a correlation of fewer than 3 entries) is stored as null
        agreement = None if res.agreement is None else {
            k: v if math.isfinite(v) else None for k, v in res.agreement.items()}
        att.status, att.finished_at, att.agreement = "succeeded", utcnow(), agreement
        att.attributable = None if sig is None else sig.attributable
        att.significance = None if sig is None else _significance_json(le, sig)
        nearest = [_item_of_index(le, i) for i in check.items]
        top_cf = exact[0] if exact is not None and res.exact and res.exact[0] else None
        causal = causal_measures(res.image, top_cf, res.radius, res.radius_over, images,
                                 nearest=int(check.items[0]))
        att.causal = {
            "radius": causal.radius, "radius_over_verified": causal.verified,
            "nearest_training_item_id": nearest[0],
            "top_counterfactual_nearest_training_item_id":
                None if causal.top_nearest is None else _item_of_index(le, causal.top_nearest),
            "top_changes_nearest": causal.top_changes_nearest}
        att.copy_of_item_id = nearest[0] if check.near_copy else None
        att.near_copy = {
            "nearest": [{"training_item_id": item, "distance": float(d)}
                        for item, d in zip(nearest, check.distances, strict=True)],
            "ratio": check.ratio, "threshold": check.threshold, "near_copy": check.near_copy,
            "confirmed": check.confirmed, "moved_away": check.moved_away}
        result = {"attribution_id": attribution_id, "entries": len(res.ranking), "verified": cfg.verify_top_k,
                  "attributable": att.attributable, "near_copy": check.near_copy}
        jobs.finish(s, job_id, result)
    return result


# --------------------------------------------------------------------------- validate
def run_validate(db: Database, cache: EngineCache, job: Job, progress: Progress) -> dict[str, Any]:
    """Run the job's experiment (experiments.run of its config) in a folder of its own under
    ``data_dir/validations`` and store its report and PNG figures with the job. A retried job
    starts again from nothing."""
    config = validation_config(job.payload)
    experiment = config.experiment
    out = cache.settings.data_dir / "validations" / job.id
    shutil.rmtree(out, ignore_errors=True)
    stages = config.stages()
    last = [0.0, 0.0]  # progress, time: the job row is touched at most every 0.5 % or 2 s

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            return
        p = 0.02 + 0.96 * (stages.index(stage) + done / max(total, 1)) / len(stages)
        now = time.monotonic()
        if p - last[0] >= 0.005 or (p > last[0] and now - last[1] >= 2.0):
            last[:] = [p, now]
            progress(p)

    try:
        report = experiments.run(config, out, on_progress, device=cache.device, log=log.info)
    except (ExperimentError, DatasetError) as exc:
        raise JobError(f"validate {experiment}: {exc}") from exc
    with db.session() as s:
        figures = {}
        for name in report.figures:
            if not (out / name).is_file():  # e.g. fidelity_images.png needs an example to show
                continue
            png = (out / name).read_bytes()
            with PILImage.open(io.BytesIO(png)) as im:
                figures[name] = put_image(s, png, im.width, im.height)
        result = {"experiment": experiment, "passed": report.passed, "report": report.to_json(),
                  "figures": figures, "folder": str(out.resolve())}
        jobs.finish(s, job.id, result)
    return result


def validation_config(payload: dict[str, Any]) -> AnyConfig:
    """The experiment config of a validate job's payload: its ``config``; or, for a job stored
    before configs, the config its ``options`` (the `attrib validate` flags the service wrote:
    ``--name value`` pairs and the switches) give. JobError when neither can be read."""
    experiment = payload.get("experiment")
    cls = CONFIGS.get(str(experiment))
    if cls is None:
        raise JobError(f"validate: unknown experiment {experiment!r} (one of {', '.join(CONFIGS)})")
    try:
        if "config" in payload:
            return cls.model_validate(payload["config"])
        return cls.from_options(_options_of_flags(cls, [str(o) for o in payload.get("options", [])]))
    except ValueError as exc:  # pydantic's ValidationError is one
        raise JobError(f"validate {experiment}: cannot read the job's stored options: {exc}") from exc


def _options_of_flags(cls: type[AnyConfig], flags: list[str]) -> dict[str, Any]:
    names = set(cls.model_fields) | set(ENSEMBLE_OPTIONS)
    options: dict[str, Any] = {}
    items = iter(flags)
    for flag in items:
        name = flag.removeprefix("--").replace("-", "_")
        if flag == "--no-lpips":
            options["lpips"] = False
        elif not flag.startswith("--") or name not in names:
            raise ValueError(f"unknown option {flag!r}")
        elif name in cls.model_fields and cls.model_fields[name].annotation is bool:
            options[name] = True
        else:
            value = next(items, None)
            if value is None:
                raise ValueError(f"{flag} has no value")
            options[name] = value
    return options


# ----------------------------------------------------------------- owner counterfactual
def run_counterfactual(db: Database, cache: EngineCache, job: Job, progress: Progress) -> dict[str, Any]:
    """The generation resampled with the same noise without the members in ``payload["members"]``
    (those trained on any of one owner's works; app.shares.owner_members chose them), the others
    the generation's version serves weighted equally; stores its PNG and its distance to the
    generation."""
    attribution_id, mask = int(job.payload["attribution_id"]), int(job.payload["members"])
    with db.session() as s:
        att, le = _attribution_and_ensemble(s, cache, attribution_id)
    n = le.ens.n
    kept = 1.0 - torch.from_numpy(mask_bits(mask, n)).to(torch.float64)
    if le.served is not None:  # a version masked by opt-outs serves only its members
        kept = kept * le.served.to(torch.float64)
    if kept.sum() < 1:
        raise JobError(f"members {mask:#x} leave none of the {n} members")
    gen, f = _ensure_sample(db, le, att.generation_id)
    progress(0.2)
    tape = make_tape([gen.seed], le.ens.shape, gen.steps)
    x = exact_counterfactuals(le.ens.net, le.ens.schedule, tape, (kept / kept.sum())[None],
                              members=le.members)[0, 0].cpu()
    progress(0.9)
    with db.session() as s:
        sha = put_image(s, png_bytes(x), x.shape[-1], x.shape[-2])
        result = {"attribution_id": attribution_id, "owner_id": int(job.payload["owner_id"]),
                  "members_dropped": n - int(kept.sum()), "members_left": int(kept.sum()),
                  "image_sha": sha, "l2_distance": float(l2_distance(x.double(), f.double()))}
        jobs.finish(s, job.id, result)
    return result


# ---------------------------------------------------------------------------- retrain
def run_retrain(db: Database, cache: EngineCache, job: Job, progress: Progress) -> dict[str, Any]:
    """Retrain the members an opt-out dropped from a lineage and serve the result (app.unlearning)."""
    settings = cache.settings
    options = RetrainOptions(settings.checkpoint_dir, cache.device, settings.retrain_checkpoint_every)
    try:
        return retrain_lineage(db, int(job.payload["lineage_id"]), options, job_id=job.id, progress=progress)
    except OptOutError as exc:
        raise JobError(f"retrain: {exc}") from exc


RUNNERS: dict[str, Callable[[Database, EngineCache, Job, Progress], dict[str, Any]]] = {
    "generate": run_generate,
    "attribute": run_attribute,
    "validate": run_validate,
    "counterfactual": run_counterfactual,
    "retrain": run_retrain,
}
