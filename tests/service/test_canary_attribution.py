"""A planted canary named by the service for real: a work made distinctive (inverted) and listed 30
times in its members' splits, an ensemble of n = 12 (864 decoy codes: p-values down to 1/865, below
0.05 / 5), a generation whose nearest training image is the canary. POST /attribute runs the
selective test through conclude(); nothing is written into the database by hand: the canary is
named, ranks first, and its owner gets the whole share -- on the API, the operator's page and the
holder's shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.orm import TrainingItem
from experiments.canaries import plant_canaries
from models.codes import make_codebook
from models.data import ImageDataset, load_digits
from models.ensemble import PRESETS, DatasetInfo, Ensemble
from models.train import TrainConfig, train
from tests.service.attributed import csrf_of, sign_in
from tests.service.conftest import Service, owner_of_label, populate

CANARY = 0  # the item made a canary (label 0)
SEED = 3  # a generation whose nearest training image is the canary (checked below)


@pytest.fixture(scope="module")
def canary_dataset() -> ImageDataset:
    return plant_canaries(load_digits().subset(np.arange(60)), np.array([CANARY]), 30).data


@pytest.fixture(scope="module")
def template_db(canary_dataset: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service's database for this module (overrides conftest's): the planted works, and the
    ensemble trained on them with the canary duplicated."""
    repeats = np.ones(canary_dataset.N, dtype=np.int64)
    repeats[CANARY] = 30
    book = make_codebook(canary_dataset.N, 12, 6, seed=0)
    ds = canary_dataset
    info = DatasetInfo(ds.name, ds.fingerprint(), ds.N, ds.shape)
    ens = Ensemble.create(PRESETS["tiny"], book, info, seed=0)
    train(ens, canary_dataset.to_tensor(), TrainConfig(300, 8, 2e-3, seed=0), repeats=repeats)
    folder = tmp_path_factory.mktemp("canary")
    ckpt = ens.save(folder / "canary.pt")
    path = folder / "template.db"
    populate(f"sqlite:///{path}", canary_dataset, ckpt)
    return path


def test_a_planted_canary_is_named_and_gets_the_share(svc: Service, canary_dataset: ImageDataset) -> None:
    r = svc.client.post("/generate", json={"seeds": [SEED]}, headers=svc.op())
    assert r.status_code == 202, r.text
    gid = r.json()["generation_ids"][0]
    a = svc.client.post("/attribute", json={"generation_id": gid, "top_k": 5}, headers=svc.op())
    assert a.status_code == 202, a.text
    assert svc.run_jobs() == ["succeeded", "succeeded"]
    aid = a.json()["attribution_id"]
    att = svc.client.get(f"/attributions/{aid}", headers=svc.op()).json()
    with svc.db.session() as s:
        canary_id = s.scalar(select(TrainingItem.id).where(TrainingItem.index == CANARY))
    owner = owner_of_label(int(canary_dataset.labels[CANARY]))  # type: ignore[index]
    sig = att["significance"]
    assert att["near_copy"]["nearest"][0]["training_item_id"] == canary_id  # the canary is nearest
    assert sig["decoys"] == 864 and sig["sources_tested"] == 5 and sig["threshold"] == pytest.approx(0.01)
    assert sig["candidates"][0]["training_item_id"] == canary_id
    assert sig["candidates"][0]["p_value"] == pytest.approx(1 / 865)  # no decoy moves it as far
    assert att["attributable"] is True and sig["named_training_item_id"] == canary_id
    entries = att["entries"]
    assert entries[0]["training_item_id"] == canary_id and entries[0]["significant"] is True
    assert [e["significant"] for e in entries[1:]] == [False] * 4
    assert entries[0]["owner_name"] == owner and entries[0]["counterfactual_kind"] == "exact"

    shares = svc.client.get(f"/attributions/{aid}/shares", headers=svc.op()).json()
    assert shares["attributable"] is True and shares["status"] == "attributed"
    got = {o["owner_name"]: o["share"] for o in shares["shares"]}
    assert got[owner] == 1.0 and set(got.values()) <= {0.0, 1.0} and sum(got.values()) == 1.0
    mine = svc.client.get("/me/shares", headers=svc.owner(owner)).json()
    assert [(i["attribution_id"], i["share"]) for i in mine["items"]] == [(aid, 1.0)]

    c = svc.client
    sign_in(c, svc.operator_key)
    page = c.get(f"/web/attributions/{aid}").text
    assert f"work {canary_id} is the nearest significant one (p = 0.0012" in page
    assert csrf_of(page)
