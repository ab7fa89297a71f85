"""Validation experiments as service jobs (issue 4: "the same as worker jobs"): POST /validations
queues the experiment's config, a worker runs it, GET /validations/{id} serves the report and
figures. The job's report is checked against the CLI run in-process with the flags the job shows;
jobs stored before configs (their flags only) still run."""

from __future__ import annotations

import io
import json
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from app import jobs
from app.cli import main
from app.orm import Dataset, EnsembleRow, Job
from app.registry import import_dataset, register_ensemble
from app.schemas import ClassifierName, PresetName
from experiments.classifiers import CLASSIFIERS
from models.data import load_digits
from models.ensemble import PRESETS, Ensemble
from tests.service.conftest import Service

TINY_TRAIN = {"preset": "tiny", "n": 8, "train_steps": 6}
TIMING = ("seconds", "total_seconds")


def post(svc: Service, body: dict, **headers: str) -> dict:
    r = svc.client.post("/validations", json=body, headers={**svc.op(), **headers})
    assert r.status_code == 202, r.text
    return r.json()


def get(svc: Service, job_id: str) -> dict:
    r = svc.client.get(f"/validations/{job_id}", headers=svc.op())
    assert r.status_code == 200, r.text
    return r.json()


def comparable(report: dict) -> dict:
    """The report without what differs between two runs of the same experiment: timings and
    the folder the trained ensemble was written to."""
    r = {k: v for k, v in report.items() if k not in TIMING}
    r["ensemble"] = {k: v for k, v in r["ensemble"].items() if k not in ("checkpoint", "train_seconds")}
    return r


def test_copies_job_runs_what_the_cli_runs(svc: Service, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    body = {"experiment": "copies", "samples": 4, "steps": 4, "top": 3, "exact": "all",
            "train": {"subset": 40, **TINY_TRAIN}}
    acc = post(svc, body)
    assert acc["url"] == f"/validations/{acc['job_id']}" and acc["experiment"] == "copies"
    v = get(svc, acc["job_id"])
    assert v["status"] == "queued" and v["report"] is None and v["passed"] is None and v["figures"] == {}
    assert v["request"] == body
    flags = v["options"]
    assert flags == ["--exact", "all", "--samples", "4", "--steps", "4", "--top", "3",
                     "--n", "8", "--preset", "tiny", "--subset", "40", "--train-steps", "6"]
    r = svc.client.get(f"/validations/{acc['job_id']}/figures/copies.png", headers=svc.op())
    assert r.status_code == 404 and "queued" in r.json()["detail"]

    assert svc.run_jobs() == ["succeeded"]
    v = get(svc, acc["job_id"])
    assert v["status"] == "succeeded" and v["progress"] == 1.0 and v["error"] is None
    rep = v["report"]
    assert rep["experiment"].startswith("copy detection") and rep["samples"] == 4
    assert rep["ensemble"]["items"] == 40 and rep["ensemble"]["n"] == 8
    assert rep["exact"]["all_checked"]["n"] == 4 and rep["exact"]["sources"] == 40
    assert v["passed"] is rep["passed"]
    folder = svc.settings.data_dir / "validations" / acc["job_id"]
    assert json.loads((folder / "report.json").read_text()) == rep
    assert rep["ensemble"]["checkpoint"] == str(folder / "ensemble.pt")
    assert set(v["figures"]) == {"copies.png"}
    png = svc.client.get(v["figures"]["copies.png"], headers=svc.op())
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (folder / "copies.png").read_bytes()
    with PILImage.open(io.BytesIO(png.content)) as im:
        assert im.size[0] > 100
    job = svc.client.get(f"/jobs/{acc['job_id']}", headers=svc.op()).json()
    assert job["kind"] == "validate" and job["result"]["report"] == rep

    # The CLI with the flags the job shows gives the same report (training is seeded).
    out = tmp_path / "cli"
    assert main(["validate", "copies", "--out", str(out), "--device", "cpu", "--json", *flags]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert comparable(cli) == comparable(rep)


def test_canaries_job_runs_what_the_cli_runs(svc: Service, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The canaries benchmark as a service validation: its flags, its report, the CLI's same report;
    an ensemble_id is refused (it trains its own, on planted data)."""
    body = {"experiment": "canaries", "samples": 3, "steps": 4, "canaries": 2, "duplicates": 4,
            "train": {"subset": 30, **TINY_TRAIN}}
    acc = post(svc, body)
    v = get(svc, acc["job_id"])
    assert v["options"] == ["--canaries", "2", "--duplicates", "4", "--samples", "3", "--steps", "4",
                            "--n", "8", "--preset", "tiny", "--subset", "30", "--train-steps", "6"]
    assert svc.run_jobs() == ["succeeded"]
    rep = get(svc, acc["job_id"])["report"]
    assert rep["experiment"].startswith("canaries") and len(rep["canaries"]) == 2 and rep["samples"] == 3
    assert set(rep["targets"]) == {"top1_near_canary", "attributable_near_canary", "far_near_canary",
                                   "canary_named_elsewhere", "shuffled_attributable"}
    out = tmp_path / "cli"
    assert main(["validate", "canaries", "--out", str(out), "--device", "cpu", "--json", *v["options"]]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert comparable(cli) == comparable(rep)
    r = svc.client.post("/validations", json={"experiment": "canaries", "ensemble_id": 1}, headers=svc.op())
    assert r.status_code == 422 and "ensemble_id" in r.text


def test_fidelity_on_a_registered_ensemble(svc: Service, cli_ckpt: Path) -> None:
    """An ensemble trained by `attrib train` (its checkpoint names its data), imported and registered."""
    with svc.db.session() as s:
        import_dataset(s, load_digits().sample(60, 0), "digits-60", {"data": "digits", "subset": 60})
        ens_id = register_ensemble(s, Ensemble.load(cli_ckpt), cli_ckpt, "cli").id
    ckpt = str(cli_ckpt.resolve())
    acc = post(svc, {"experiment": "fidelity", "ensemble_id": ens_id, "samples": 2, "steps": 4,
                     "sources": "all", "recall_k": 3, "top": 6})
    assert get(svc, acc["job_id"])["options"][:2] == ["--checkpoint", ckpt]
    assert svc.run_jobs() == ["succeeded"], get(svc, acc["job_id"])["error"]
    v = get(svc, acc["job_id"])
    rep = v["report"]
    assert rep["ensemble"]["checkpoint"] == ckpt and rep["candidates"] == "all sources"
    assert rep["k"] == 3 and len(rep["per_sample"]) == 2
    assert rep["ensemble"]["sources"] == rep["per_sample"][0]["candidates"]
    assert "fidelity.png" in v["figures"]
    assert svc.client.get(v["figures"]["fidelity.png"], headers=svc.op()).status_code == 200


def test_an_ensemble_whose_data_cannot_be_reloaded_fails_clearly(svc: Service) -> None:
    with svc.db.session() as s:  # the fixture's ensemble: built in code, no data spec in it
        ens_id = s.scalars(select(EnsembleRow)).one().id
    r = svc.client.post("/validations", json={"experiment": "copies", "ensemble_id": ens_id, "steps": 21},
                        headers=svc.op())
    assert r.status_code == 409 and "T=20" in r.json()["detail"]
    acc = post(svc, {"experiment": "copies", "ensemble_id": ens_id, "samples": 1})
    assert svc.run_jobs() == ["failed"]
    assert "does not record the data it was trained on" in get(svc, acc["job_id"])["error"]


def test_bad_options_fail_the_job_with_the_cli_message(svc: Service) -> None:
    acc = post(svc, {"experiment": "classes", "exclude_classes": ["5", "x"], "samples": 2, "steps": 4,
                     "train": TINY_TRAIN})
    assert "--exclude-classes" in get(svc, acc["job_id"])["options"]
    assert svc.run_jobs() == ["failed"]
    v = get(svc, acc["job_id"])
    assert v["status"] == "failed" and "no class x" in v["error"] and v["report"] is None


def test_dataset_id_trains_on_its_data(svc: Service) -> None:
    with svc.db.session() as s:
        ds = s.scalars(select(Dataset)).one()
        sub = Dataset(name="digits-100-7", channels=1, height=8, width=8, item_count=100,
                      spec={"data": "digits", "subset": 100, "subset_seed": 7}, fingerprint="x" * 64)
        s.add(sub)
        s.flush()
        ds_id, sub_id = ds.id, sub.id
    acc = post(svc, {"experiment": "copies", "train": {"dataset_id": ds_id, "subset": 30, "subset_seed": 2}})
    assert get(svc, acc["job_id"])["options"] == ["--data", "digits", "--subset", "30", "--subset-seed", "2"]
    acc = post(svc, {"experiment": "fidelity", "train": {"dataset_id": sub_id}})
    assert get(svc, acc["job_id"])["options"] == ["--data", "digits", "--subset", "100", "--subset-seed", "7"]
    body = {"experiment": "fidelity", "train": {"dataset_id": sub_id, "subset": 50}}
    r = svc.client.post("/validations", json=body, headers=svc.op())
    assert r.status_code == 409 and "itself a subset" in r.json()["detail"]


def test_idempotency_key(svc: Service) -> None:
    h = {"Idempotency-Key": "val-1"}
    a, b = post(svc, {"experiment": "copies"}, **h), post(svc, {"experiment": "copies"}, **h)
    assert a == b
    with svc.db.session() as s:
        assert len(s.scalars(select(Job)).all()) == 1
    r = svc.client.post("/generate", json={"seeds": [1]}, headers={**svc.op(), **h})
    assert r.status_code == 409 and "val-1" in r.json()["detail"]


@pytest.mark.parametrize("body, needle", [
    ({"experiment": "copies", "classifier": "svc"}, "classifier"),
    ({"experiment": "fidelity", "copy_ratio": 0.3}, "copy_ratio"),
    ({"experiment": "classes", "sources": 10}, "sources"),
    ({"experiment": "classes", "ensemble_id": 1}, "ensemble_id"),
    ({"experiment": "fidelity", "ensemble_id": 1, "train": {"train_steps": 5}}, "not both"),
    ({"experiment": "copies", "ensemble_id": 1, "train": {}}, "not both"),
    ({"experiment": "fidelity", "train": {"k": 8}}, "k"),
    ({"experiment": "fidelity", "train": {"n": 1}}, "n"),
    ({"experiment": "fidelity", "sources": 0}, "sources"),
    ({"experiment": "fidelity", "sources": "some"}, "sources"),
    ({"experiment": "copies", "train": {"preset": "huge"}}, "preset"),
    ({"experiment": "copies", "preset": "tiny"}, "preset"),
    ({"experiment": "everything"}, "experiment"),
    ({"experiment": "copies", "samples": 0}, "samples"),
    ({"experiment": "classes", "exclude_classes": ["5,7"]}, "exclude_classes"),
    ({"experiment": "copies", "out": "/etc"}, "out"),
    ({"experiment": "copies", "train": {"data": "/etc/passwd"}}, "data"),
    ({}, "experiment"),
])
def test_bad_requests_422(svc: Service, body: dict, needle: str) -> None:
    r = svc.client.post("/validations", json=body, headers=svc.op())
    assert r.status_code == 422, body
    assert needle in json.dumps(r.json()["detail"])
    with svc.db.session() as s:
        assert s.scalars(select(Job)).first() is None  # nothing queued


@pytest.mark.parametrize("body, needle", [
    ({"experiment": "copies", "samples": 11}, "max_validation_samples=10"),
    ({"experiment": "copies", "train": {"train_steps": 101}}, "max_validation_train_steps=100"),
    ({"experiment": "copies", "steps": 9}, "max_steps=8"),
])
def test_limits_name_the_setting(make_service: Callable[..., Service], body: dict, needle: str) -> None:
    svc = make_service(max_validation_samples=10, max_validation_train_steps=100, max_steps=8)
    r = svc.client.post("/validations", json=body, headers=svc.op())
    assert r.status_code == 422 and needle in r.json()["detail"]
    schemas = svc.client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("ClassesValidation", "FidelityValidation", "CopiesValidation"):
        samples = schemas[model]["properties"]["samples"]["anyOf"]
        assert {"type": "integer", "minimum": 1, "maximum": 10} in samples
    assert {"type": "integer", "minimum": 1, "maximum": 100} in \
        schemas["TrainOptions"]["properties"]["train_steps"]["anyOf"]


def test_not_found_and_keys(svc: Service) -> None:
    c = svc.client
    for body in ({"experiment": "copies", "ensemble_id": 999},
                 {"experiment": "copies", "train": {"dataset_id": 999}}):
        r = c.post("/validations", json=body, headers=svc.op())
        assert r.status_code == 404 and "999" in r.json()["detail"]
    gen = c.post("/generate", json={"seeds": [1]}, headers=svc.op()).json()
    r = c.get(f"/validations/{gen['job_id']}", headers=svc.op())
    assert r.status_code == 404  # a job, but not a validation
    acc = post(svc, {"experiment": "copies"})
    assert c.get(f"/validations/{acc['job_id']}/figures/x.png", headers=svc.op()).status_code == 404
    assert c.post("/validations", json={"experiment": "copies"}).status_code == 401
    assert c.get(f"/validations/{acc['job_id']}", headers=svc.owner("alice")).status_code == 403


def test_request_literals_match_the_engine() -> None:
    assert set(typing.get_args(PresetName)) == set(PRESETS)
    assert set(typing.get_args(ClassifierName)) == set(CLASSIFIERS)


def test_list_newest_first_with_pages(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_page_size=5)
    ids = [post(svc, {"experiment": e})["job_id"] for e in ("copies", "fidelity", "classes")]
    svc.client.post("/generate", json={"seeds": [1]}, headers=svc.op())  # not a validation
    page = svc.client.get("/validations?limit=5", headers=svc.op()).json()
    assert page["total"] == 3 and [v["job_id"] for v in page["items"]] == ids[::-1]
    assert [v["experiment"] for v in page["items"]] == ["classes", "fidelity", "copies"]
    assert all(v["status"] == "queued" and v["passed"] is None for v in page["items"])
    assert page["items"][0]["url"] == f"/validations/{ids[2]}"
    page = svc.client.get("/validations?offset=1&limit=1", headers=svc.op()).json()
    assert [v["job_id"] for v in page["items"]] == [ids[1]] and page["total"] == 3
    r = svc.client.get("/validations?limit=6", headers=svc.op())
    assert r.status_code == 422 and "max_page_size=5" in r.json()["detail"]
    assert svc.client.get("/validations", headers=svc.owner("alice")).status_code == 403


def test_the_job_reports_progress_through_its_stages(svc: Service) -> None:
    from worker.engine import run_validate

    acc = post(svc, {"experiment": "fidelity", "samples": 2, "steps": 3, "sources": "all",
                     "train": {"subset": 30, **TINY_TRAIN, "train_steps": 40}})
    with svc.db.session() as s:
        job = s.get(Job, acc["job_id"])
        assert job is not None
        s.expunge(job)
    seen: list[float] = []
    run_validate(svc.db, svc.worker.cache, job, seen.append)
    # stages train, jacobian, exact: a third of 0.96 each, after 0.02
    assert seen == sorted(seen) and seen[0] >= 0.02 and seen[-1] == pytest.approx(0.98)
    assert any(0.02 < p < 0.34 for p in seen)  # within training
    for end in (0.34, 0.66, 0.98):  # the end of each stage
        assert any(abs(p - end) < 1e-9 for p in seen), (end, seen)
    assert len(seen) <= 200 + 2  # throttled: at most every 0.5 %
    assert get(svc, acc["job_id"])["report"]["ensemble"]["trained_steps"] == 40


def test_progress_stages_follow_the_config() -> None:
    from pydantic import ValidationError

    from experiments.classes import ClassesConfig
    from experiments.common import Checkpoint
    from experiments.copies import CopiesConfig
    from worker.engine import JobError, validation_config

    assert CopiesConfig().stages() == ("train", "jacobian", "trust")
    assert CopiesConfig(exact="copies").stages() == ("train", "jacobian", "trust", "exact")
    checkpoint = Checkpoint(checkpoint="e.pt")
    assert CopiesConfig(exact="none", ensemble=checkpoint).stages() == ("jacobian", "trust")
    assert ClassesConfig(samples=3).stages() == ("train", "sample", "exact")
    with pytest.raises(ValidationError, match="exact"):
        CopiesConfig.model_validate({"exact": "most"})
    with pytest.raises(JobError, match="unknown experiment"):
        validation_config({"experiment": "styles", "config": {}})


def _old_payload(experiment: str, options: list[str], request: dict) -> dict:
    """A validate job as the service stored it before configs: the `attrib validate` flags."""
    return {"experiment": experiment, "options": options, "request": request}


def test_jobs_stored_with_flags_still_run(svc: Service) -> None:
    """Jobs queued before configs (payload: experiment, options, request) run as their flags
    say; flags this build does not know fail the job with a message that names them."""
    options = ["--exact", "all", "--samples", "2", "--steps", "3", "--top", "3",
               "--n", "8", "--preset", "tiny", "--subset", "30", "--train-steps", "6"]
    request = {"experiment": "copies", "samples": 2, "steps": 3, "top": 3, "exact": "all",
               "train": {"subset": 30, **TINY_TRAIN}}
    with svc.db.session() as s:
        old = jobs.new_job(s, "validate", _old_payload("copies", options, request))
        bad = jobs.new_job(s, "validate",
                           _old_payload("fidelity", ["--sources", "all", "--colour", "red"], {}))
    assert svc.run_jobs() == ["succeeded", "failed"]
    v = get(svc, old)
    assert v["options"] == options and v["request"] == request
    rep = v["report"]
    assert rep["samples"] == 2 and rep["ensemble"]["items"] == 30 and rep["ensemble"]["n"] == 8
    assert rep["exact"]["all_checked"]["n"] == 2 and rep["ensemble"]["trained_steps"] == 6
    error = get(svc, bad)["error"]
    assert "validate fidelity" in error and "--colour" in error


def test_old_options_read_as_the_cli_reads_them() -> None:
    """The reader of stored flags gives the config the CLI's parser gives for the same flags."""
    from app.cli import build_parser
    from app.cli.validate import config_of
    from worker.engine import validation_config

    for experiment, options in (
            ("classes", ["--exclude-classes", "5,7", "--no-lpips", "--classifier", "mlp", "--data", "digits",
                         "--subset", "100", "--subset-seed", "7", "--n", "8"]),
            ("fidelity", ["--checkpoint", "e.pt", "--sources", "all", "--recall-k", "4", "--broken"]),
            ("copies", ["--copy-ratio", "0.25", "--exact", "copies", "--lr", "0.01", "--seed", "3"])):
        args = build_parser().parse_args(["validate", experiment, "--out", "x", *options])
        assert validation_config(_old_payload(experiment, options, {})) == config_of(args), experiment


@pytest.mark.parametrize("body", [
    {"experiment": "classes", "exclude_classes": ["5", "7"], "classifier": "mlp", "codes": "random",
     "min_confidence": 0.8, "lpips": False},
    {"experiment": "fidelity", "sources": "all", "top": 7, "recall_k": 4, "broken": True},
    {"experiment": "copies", "copy_ratio": 0.25, "top": 3, "exact": "copies"},
])
def test_every_request_field_is_a_flag_the_cli_takes(body: dict) -> None:
    """Request fields and `attrib validate` flags stay in step: every field of every experiment,
    set, gives options the CLI's own parser accepts, with the values given."""
    from pydantic import TypeAdapter

    from app.cli import build_parser
    from app.cli.validate import config_of
    from app.schemas import ValidationCreate, validation_config, validation_flags

    train = {"subset": 50, "subset_seed": 3, "preset": "tiny", "n": 8, "train_steps": 7, "batch_size": 4,
             "lr": 0.01}
    req = TypeAdapter(ValidationCreate).validate_python(
        {**body, "seed": 2, "samples": 5, "seed_start": 9, "steps": 6, "train": train})
    config = validation_config(req, {})
    flags = validation_flags(config)
    args = build_parser().parse_args(["validate", body["experiment"], "--out", "x", *flags])
    assert config_of(args) == config  # the flags shown give the very config the job runs
    for name, value in {**train, "seed": 2, "samples": 5, "seed_start": 9, "steps": 6}.items():
        assert getattr(args, name) == value, name
    expect = {k: v for k, v in body.items() if k != "experiment"}
    if "exclude_classes" in expect:
        expect["exclude_classes"] = "5,7"
    if "lpips" in expect:
        assert args.no_lpips is True
        del expect["lpips"]
    for name, value in expect.items():
        assert getattr(args, name) == value, name
