"""Opt-out as exact unlearning through the API and the worker: masked at once (new generations
are exactly the sampler with the masked weights, the work's ablation changes nothing), retrained
in the background (manifests without the work, every other member byte-identical, Definition 1),
resumed after a kill and finished once, overlapping opt-outs during a retrain in one version."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

import app.unlearning
import models.unlearn
from app.cli.main import main
from app.orm import EnsembleRow, Generation, Job, TrainingItem
from app.settings import get_settings
from models.ablation import ablation_weights
from models.codes import mask_bits, member_manifests, satisfies_definition1
from models.ensemble import Ensemble
from models.images import png_bytes
from models.sampler import make_tape, sample
from models.train import ProgressFn
from models.unet import WideUNet
from tests.service.conftest import Service, owner_of_label
from worker.tasks import execute_job

WORK_INDEX = 7


def work(svc: Service, index: int = WORK_INDEX) -> tuple[int, str]:
    """(training item id, owner name) of the work at ``index``."""
    with svc.db.session() as s:
        item = s.scalar(select(TrainingItem).where(TrainingItem.index == index))
        assert item is not None
        return item.id, owner_of_label(item.label)


def opt_out(svc: Service, work_id: int, headers: dict[str, str], status: int = 202, **body: object) -> dict:
    r = svc.client.post(f"/works/{work_id}/opt-out", json=body, headers=headers)
    assert r.status_code == status, r.text
    return r.json()


def generate(svc: Service, seeds: list[int]) -> dict:
    r = svc.client.post("/generate", json={"seeds": seeds}, headers=svc.op())
    assert r.status_code == 202, r.text
    assert execute_job(r.json()["job_id"], svc.worker) in ("succeeded", "skipped")
    return r.json()


def attribute(svc: Service, generation_id: int, **kw: object) -> dict:
    r = svc.client.post("/attribute", json={"generation_id": generation_id, **kw}, headers=svc.op())
    assert r.status_code == 202, r.text
    assert execute_job(r.json()["job_id"], svc.worker) == "succeeded"
    return svc.client.get(f"/attributions/{r.json()['attribution_id']}", headers=svc.op()).json()


def version(svc: Service, ensemble_id: int) -> EnsembleRow:
    with svc.db.session() as s:
        row = s.get(EnsembleRow, ensemble_id)
        assert row is not None
        s.expunge(row)
        return row


def code_bits(ens: Ensemble, index: int) -> np.ndarray:
    return ens.codebook.bits()[index]  # item granularity: source i is item i


def pixels(png: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(png)) as im:
        return np.asarray(im).astype(int)


def test_opt_out_masks_at_once_then_the_retrain_restores(
    svc: Service, tiny_ckpt: Path, tiny_dataset: Any
) -> None:
    ens = Ensemble.load(tiny_ckpt).for_inference()
    work_id, holder = work(svc)
    other = next(o for o in svc.owner_keys if o != holder)
    before = generate(svc, [0])
    old_gen = before["generation_ids"][0]
    old_png = svc.client.get(f"/generations/{old_gen}/image.png", headers=svc.op()).content
    old_att = attribute(svc, old_gen, top_k=60)
    assert work_id in [e["training_item_id"] for e in old_att["entries"]]

    # Another holder's work is 404; the holder withdraws it (an operator could too).
    opt_out(svc, work_id, svc.owner(other), 404)
    opt = opt_out(svc, work_id, svc.owner(holder), reason="no longer licensed")
    S = [int(i) for i in np.flatnonzero(code_bits(ens, WORK_INDEX))]
    assert (
        opt["state"] == "masked" and opt["reason"] == "no longer licensed" and opt["requested_by"] == "holder"
    )
    [eff] = opt["ensembles"]
    assert (
        eff["members"] == S
        and eff["trained_version_id"] == before["ensemble_id"]
        and eff["state"] == "masked"
    )
    masked_id, job_id = eff["masked_version_id"], eff["retrain_job_id"]
    assert eff["serving_version_id"] == masked_id
    again = opt_out(svc, work_id, svc.op(), 200, reason="other")
    assert again["id"] == opt["id"] and again["reason"] == "no longer licensed"
    assert svc.client.get(f"/opt-outs/{opt['id']}", headers=svc.owner(other)).status_code == 404
    assert svc.client.get(f"/works/{work_id}", headers=svc.owner(holder)).json()["opt_out"]["id"] == opt["id"]
    assert svc.client.get(f"/opt-outs/{opt['id']}", headers=svc.op()).json()["state"] == "masked"

    # At once: new generations come from the masked version, which is the ensemble of the members
    # that never saw the work: built here on its own (those members' parameters, nothing else),
    # sampled with its uniform weights and the same noise tape.
    after = generate(svc, [0])
    assert after["ensemble_id"] == masked_id
    kept = [i for i in range(ens.n) if i not in S]
    assert len(kept) == ens.n - ens.k
    sub = WideUNet(ens.net.config, len(kept), torch.Generator().manual_seed(0))
    sub.load_state_dict({key: value[kept] for key, value in ens.net.state_dict().items()})
    tape = make_tape([0], ens.shape, after["steps"])
    x = sample(sub.to(next(ens.net.parameters()).dtype), ens.schedule, tape)[0]
    png = svc.client.get(f"/generations/{after['generation_ids'][0]}/image.png", headers=svc.op()).content
    assert png != old_png
    assert np.abs(pixels(png) - pixels(png_bytes(x))).max() <= 1  # (float sums in another order)
    with svc.db.session() as s:
        gen = s.get(Generation, after["generation_ids"][0])
        assert gen is not None and gen.sample is not None
        stored = np.frombuffer(gen.sample, dtype=np.float32).reshape(x.shape)
    np.testing.assert_allclose(stored, x.numpy(), atol=1e-5)
    # The work's exact ablation changes nothing: its members already carry weight 0, the others 1/4.
    served = torch.from_numpy(1 - code_bits(ens, WORK_INDEX).astype(np.int64))
    w_ablated = ablation_weights(torch.from_numpy(code_bits(ens, WORK_INDEX))[None], ens.k, served)[0]
    assert w_ablated.tolist() == [0.0 if i in S else 1 / len(kept) for i in range(ens.n)]
    assert png_bytes(sample(ens.net, ens.schedule, tape, w_ablated)[0]) == png

    # Withdrawn works leave new rankings (of new and of old generations); old rankings are kept,
    # their entry marked as made before the withdrawal.
    new_att = attribute(svc, after["generation_ids"][0], top_k=60, verify_top_k=2)
    assert work_id not in [e["training_item_id"] for e in new_att["entries"]]
    assert all(e["withdrawn_at"] is None for e in new_att["entries"])
    assert work_id not in [e["training_item_id"] for e in attribute(svc, old_gen, top_k=59)["entries"]]
    old_again = svc.client.get(f"/attributions/{old_att['id']}", headers=svc.op()).json()
    assert [e["training_item_id"] for e in old_again["entries"]] == [
        e["training_item_id"] for e in old_att["entries"]
    ]
    assert [e["training_item_id"] for e in old_again["entries"] if e["withdrawn_at"]] == [work_id]

    # The retrain: exactly S, from scratch, without the work; everything else byte-identical.
    assert execute_job(job_id, svc.worker) == "succeeded"
    done = svc.client.get(f"/opt-outs/{opt['id']}", headers=svc.owner(holder)).json()
    [eff] = done["ensembles"]
    assert (
        done["state"] == eff["state"] == "restored"
        and eff["serving_version_id"] == eff["restored_version_id"]
    )
    restored = version(svc, eff["restored_version_id"])
    assert (restored.parent_id, restored.withdrawn, restored.status) == (masked_id, [work_id], "ready")
    assert restored.served_members == (1 << ens.n) - 1
    assert version(svc, masked_id).status == version(svc, before["ensemble_id"]).status == "superseded"
    new = Ensemble.load(restored.checkpoint)
    shas = [tiny_dataset.item_sha256(i) for i in range(tiny_dataset.N)]
    assert restored.manifests == member_manifests(new.codebook, shas)
    parent_manifests = member_manifests(ens.codebook, shas)
    assert [restored.manifests[i] != parent_manifests[i] for i in range(ens.n)] == [
        i in S for i in range(ens.n)
    ]
    assert all(WORK_INDEX not in split for split in new.codebook.member_items())
    for key, value in ens.net.state_dict().items():
        for i in range(ens.n):
            assert torch.equal(value[i], new.net.state_dict()[key][i]) == (i not in S), (key, i)
    assert satisfies_definition1(new.codebook.codes[new.codebook.active_sources()])

    # Generations keep the version that made them; new ones come from the restored version.
    assert (
        svc.client.get(f"/generations/{old_gen}", headers=svc.op()).json()["ensemble_id"]
        == before["ensemble_id"]
    )
    assert svc.client.get(f"/generations/{old_gen}/image.png", headers=svc.op()).content == old_png
    later = generate(svc, [0])
    assert later["ensemble_id"] == restored.id
    later_png = svc.client.get(
        f"/generations/{later['generation_ids'][0]}/image.png", headers=svc.op()
    ).content
    assert later_png == png_bytes(sample(new.for_inference().net, new.schedule, tape)[0])
    assert work_id not in [
        e["training_item_id"] for e in attribute(svc, later["generation_ids"][0], top_k=60)["entries"]
    ]


def test_too_few_members_left_is_409_naming_the_retrain(make_service: Callable[..., Service]) -> None:
    svc = make_service(min_served_fraction=0.75)
    work_id, _ = work(svc)
    opt = opt_out(svc, work_id, svc.op())
    job_id = opt["ensembles"][0]["retrain_job_id"]
    r = svc.client.post("/generate", json={"seeds": [0]}, headers=svc.op())
    assert (
        r.status_code == 409 and job_id in r.json()["detail"] and "min_served_fraction" in r.json()["detail"]
    )
    r = svc.client.post("/batches", json={"count": 2}, headers=svc.op())
    assert r.status_code == 409 and job_id in r.json()["detail"]
    assert execute_job(job_id, svc.worker) == "succeeded"
    assert svc.client.post("/generate", json={"seeds": [0]}, headers=svc.op()).status_code == 202


class Killed(BaseException):
    """Stands for SIGKILL: no Exception handler runs (the job stays 'running', nothing is saved)."""


@pytest.fixture
def retrain_hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[int], None]]]:
    """Hooks called with every step of the retrains the worker runs (first, before the job's own)."""
    hooks: list[Callable[[int], None]] = []
    real = models.unlearn.retrain  # app.unlearning imports it when a retrain runs

    def hooked(*args: Any, progress: ProgressFn | None = None, **kw: Any) -> Ensemble:
        def on_step(step: int, losses: torch.Tensor) -> None:
            for hook in hooks:
                hook(step)
            if progress is not None:
                progress(step, losses)

        return real(*args, progress=on_step, **kw)

    monkeypatch.setattr(models.unlearn, "retrain", hooked)
    yield hooks


def test_a_killed_retrain_resumes_and_finishes_once(
    make_service: Callable[..., Service], retrain_hook: list[Callable[[int], None]]
) -> None:
    svc = make_service(retrain_checkpoint_every=10)
    work_id, _ = work(svc)
    opt = opt_out(svc, work_id, svc.op())
    job_id = opt["ensembles"][0]["retrain_job_id"]
    steps: list[int] = []

    def die_at_25(step: int) -> None:
        steps.append(step)
        if step == 25:
            raise Killed

    retrain_hook.append(die_at_25)
    with pytest.raises(Killed):
        execute_job(job_id, svc.worker)
    with svc.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "running"
    assert svc.client.get(f"/opt-outs/{opt['id']}", headers=svc.op()).json()["state"] == "retraining"
    retrain_hook[0] = steps.append
    steps.clear()
    assert execute_job(job_id, svc.worker) == "succeeded"
    assert steps[0] == 21 and steps[-1] == 40  # from the state saved at step 20
    assert execute_job(job_id, svc.worker) == "skipped"
    with svc.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.attempts) == ("succeeded", 2)
        versions = s.execute(select(EnsembleRow.id, EnsembleRow.status).order_by(EnsembleRow.id)).all()
    assert [status for _, status in versions] == ["superseded", "superseded", "ready"]
    assert not list(svc.settings.checkpoint_dir.glob("*.state.pt"))


@pytest.mark.parametrize("when", ["at step 5", "after the last step"])
def test_overlapping_opt_outs_during_a_retrain_end_in_one_version(
    make_service: Callable[..., Service],
    retrain_hook: list[Callable[[int], None]],
    tiny_ckpt: Path,
    when: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second opt-out hitting overlapping members while the retrain runs: noticed at the next
    saved state (step 5), or when registering (after the last step: the compare-and-set of the
    serving version fails); either way the retrain plans again and one version comes out."""
    svc = make_service(retrain_checkpoint_every=10)
    ens = Ensemble.load(tiny_ckpt)
    bits = ens.codebook.bits()
    second = next(
        i for i in range(len(bits)) if i != WORK_INDEX and 0 < (bits[i] & bits[WORK_INDEX]).sum() < ens.k
    )
    w1, _ = work(svc)
    w2, _ = work(svc, second)
    first = opt_out(svc, w1, svc.op())
    job_id = first["ensembles"][0]["retrain_job_id"]
    joined: list[dict] = []

    def second_opt_out() -> None:
        if not joined:
            joined.append(opt_out(svc, w2, svc.op()))

    steps: list[int] = []
    retrain_hook.append(steps.append)
    if when == "at step 5":
        retrain_hook.append(lambda step: second_opt_out() if step == 5 else None)
    else:
        manifests = app.unlearning.member_manifests

        def opt_out_then_manifests(*args: Any) -> list[str]:
            second_opt_out()
            return manifests(*args)

        monkeypatch.setattr(app.unlearning, "member_manifests", opt_out_then_manifests)
    assert execute_job(job_id, svc.worker) == "succeeded"
    # The first plan stops at its next saved state (step 10), or runs to the end (40) before it
    # fails to take over; then the plan with both works runs once, from its first step.
    assert steps == [*range(1, 11 if when == "at step 5" else 41), *range(1, 41)]
    [eff2] = joined[0]["ensembles"]
    assert eff2["retrain_job_id"] == job_id  # joined the running retrain: no second job
    with svc.db.session() as s:
        assert s.scalar(select(Job.id).where(Job.kind == "retrain", Job.id != job_id)) is None
        ready = s.scalars(select(EnsembleRow).where(EnsembleRow.status == "ready")).all()
        [restored] = ready
        s.expunge(restored)
    assert sorted(restored.withdrawn) == sorted([w1, w2])
    states = [svc.client.get(f"/opt-outs/{o['id']}", headers=svc.op()).json() for o in (first, joined[0])]
    assert {(o["state"], o["ensembles"][0]["restored_version_id"]) for o in states} == {
        ("restored", restored.id)
    }
    new = Ensemble.load(restored.checkpoint)
    dropped = np.flatnonzero(bits[WORK_INDEX] | bits[second])
    for key, value in ens.net.state_dict().items():
        for i in range(ens.n):
            assert torch.equal(value[i], new.net.state_dict()[key][i]) == (i not in dropped), (key, i)
    assert all(WORK_INDEX not in split and second not in split for split in new.codebook.member_items())


def test_cli_opt_out_and_retrain(
    template_db: Path,
    tmp_path: Path,
    tiny_ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`attrib opt-out WORK` and `attrib retrain`: the same functions, without the service."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(template_db, data / "attrib.db")
    for name in ("DATABASE_URL", "BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ATTRIB_DATA_DIR", str(data))
    get_settings.cache_clear()

    def attrib(*args: str) -> dict:
        assert main([*args, "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    try:
        out = attrib("opt-out", str(WORK_INDEX + 1), "--reason", "withdrawn by the archive")
        assert out["state"] == "masked" and out["reason"] == "withdrawn by the archive"
        [result] = attrib("retrain", "--device", "cpu")["retrained"]
        assert result["withdrawn_works"] == [WORK_INDEX + 1]
        assert result["retrained_members"] == [
            int(i)
            for i in np.flatnonzero(mask_bits(int(Ensemble.load(tiny_ckpt).codebook.codes[WORK_INDEX]), 8))
        ]
        again = attrib("opt-out", str(WORK_INDEX + 1))
        assert again["id"] == out["id"] and again["state"] == "restored"
        assert again["ensembles"][0]["serving_version_id"] == result["ensemble_id"]
        assert attrib("retrain")["retrained"] == []
        assert main(["opt-out", "100000"]) == 2 and "work 100000 not found" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
