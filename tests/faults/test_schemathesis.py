"""Hostile input: schemathesis' own engine (what `schemathesis run --checks all` runs) against
`attrib serve` (uvicorn, in its own process, as `make run` serves it), as an operator, as a rights
holder (both header forms), with a forged key and with none. Its examples and coverage phases
(boundary values, wrong types, missing and malformed parameters and bodies, unsupported methods)
send schema-valid and schema-violating requests for every credential; the fuzzing phase adds
random valid and invalid cases for the two principals that reach the operations' code (operator,
rights holder) -- with a forged key or none every request ends at authentication, which the
coverage phase already sends every kind of input to. Every check judges the answers; zero
failures allowed. Bounded and repeatable: a fixed seed, deterministic generation, a few fuzzed
examples per operation; the five runs go on in two processes at once (their answers do not
depend on each other's: every check judges one answer).

Below it, what the engine found once, pinned as plain requests (so a regression names itself)."""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.auth import create_key
from app.db import Database
from app.orm import Owner
from tests.conftest import service_env
from tests.procs import serve, stop
from tests.schemathesis_run import PHASES, Run, run_schemathesis
from tests.service.conftest import Service

FORGED = "attrib_000000000000_forged"
CREDENTIALS = ("operator", "rights-holder-bearer", "rights-holder-x-api-key", "forged-key", "no-key")
FUZZED = ("operator", "rights-holder-bearer")
"""The credentials the fuzzing phase runs for (the others: examples and coverage)."""


@dataclass(frozen=True)
class Served:
    """`attrib serve` on a copy of the tiny service database, and the five runs against it."""

    url: str
    runs: dict[str, Future[Run]]


def credentials(operator_key: str, alice_key: str) -> dict[str, dict[str, str]]:
    return {"operator": {"Authorization": f"Bearer {operator_key}"},
            "rights-holder-bearer": {"Authorization": f"Bearer {alice_key}"},
            "rights-holder-x-api-key": {"X-API-Key": alice_key},
            "forged-key": {"Authorization": f"Bearer {FORGED}"},
            "no-key": {}}


@pytest.fixture(scope="module")
def served(template_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the five credentials (clients of one service), their runs started at
    once in two processes (this machine's cores), each test reading its own."""
    home = tmp_path_factory.mktemp("schemathesis")
    (home / "data").mkdir()
    shutil.copy(template_db, home / "data" / "attrib.db")
    db = Database(f"sqlite:///{home / 'data' / 'attrib.db'}")
    with db.session() as s:
        _, operator_key = create_key(s, None, "schemathesis operator")
        _, alice_key = create_key(s, s.scalar(select(Owner).where(Owner.name == "alice")), "schemathesis")
    db.dispose()
    env = {**service_env(home / "data"), "ATTRIB_RATE_LIMIT_PER_MINUTE": "0", "ATTRIB_MAX_BATCH_SEEDS": "20",
           "ATTRIB_MAX_SEEDS_PER_REQUEST": "8", "ATTRIB_REAPER_INTERVAL_S": "0"}
    proc, url = serve(env, home, workers=0)  # jobs stay queued: what is tested is the HTTP surface
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    try:
        runs = {who: pool.submit(run_schemathesis, url, headers,
                                 PHASES if who in FUZZED else ("examples", "coverage"))
                for who, headers in credentials(operator_key, alice_key).items()}
        yield Served(url, runs)
    finally:
        pool.shutdown(cancel_futures=True)
        stop([proc])


@pytest.mark.parametrize("who", CREDENTIALS)
def test_every_operation_every_check(served: Served, who: str) -> None:
    run = served.runs[who].result()
    assert not run.failures, f"{len(run.failures)} failure(s):\n\n" + "\n\n".join(dict.fromkeys(run.failures))
    # It did run what it says: every operation, hostile data, methods the schema does not list.
    paths = httpx.get(f"{served.url}/openapi.json").json()["paths"]
    assert run.operations == {f"{m.upper()} {path}" for path, ops in paths.items() for m in ops}
    assert run.negative > 0.2 * run.cases, (run.negative, run.cases)
    assert {"OPTIONS", "PUT", "DELETE", "PATCH", "TRACE"} <= run.methods, run.methods


# ------------------------------------------------------------------ what it found, pinned
@pytest.mark.parametrize("value", [False, True, "2", 2.5, None])
def test_an_integer_field_takes_integers_only(svc: Service, value: object) -> None:
    # verify_top_k may be null (the service's default); no other non-integer
    nullable = 404 if value is None else 422  # generation 1 does not exist: past validation
    r = svc.client.post("/attribute", json={"generation_id": 1, "verify_top_k": value}, headers=svc.op())
    assert r.status_code == nullable, r.text
    r = svc.client.post("/batches", json={"seeds": [1], "attribute": {"verify_top_k": value}},
                        headers=svc.op())
    assert r.status_code == (202 if value is None else 422), r.text
    r = svc.client.post("/generate", json={"seeds": [1, value]}, headers=svc.op())
    assert r.status_code == 422, r.text


def test_an_integral_number_is_an_integer(svc: Service) -> None:
    """JSON Schema says 2.0 is an integer; the API agrees (and stays strict otherwise)."""
    r = svc.client.post("/generate", json={"seeds": [3.0], "steps": 2.0}, headers=svc.op())
    assert r.status_code == 202, r.text
    assert r.json()["steps"] == 2


def test_405_allows_every_method_of_the_path(svc: Service) -> None:
    for method, path, allowed in (("OPTIONS", "/validations", "GET, POST"),
                                  ("DELETE", "/validations/x", "GET"), ("PUT", "/generate", "POST")):
        r = svc.client.request(method, path, headers=svc.op())
        assert (r.status_code, r.headers["allow"]) == (405, allowed), (method, path)


def test_every_answer_is_documented(svc: Service) -> None:
    ops = svc.client.get("/openapi.json").json()["paths"]
    r = svc.client.post("/validations", content=b"\x89\xd6\xad", headers={**svc.op(),
                                                                          "Content-Type": "application/json"})
    assert r.status_code == 400 and "400" in ops["/validations"]["post"]["responses"]
    for path, methods in ops.items():
        for method, op in methods.items():
            documented = set(op["responses"])
            assert "413" in documented, (method, path)
            if "requestBody" in op:
                assert {"400", "422"} <= documented, (method, path)
            if op.get("security"):
                assert "401" in documented, (method, path)


def test_a_malformed_authorization_is_not_ignored_for_x_api_key(svc: Service) -> None:
    for auth in ("Bearer ", "Basic YWxpY2U6eA==", "bearer"):
        r = svc.client.get("/works", headers={"Authorization": auth, **svc.owner("alice")})
        assert r.status_code == 401 and "Bearer" in r.json()["detail"], (auth, r.text)
    assert svc.client.get("/works", headers=svc.owner("alice")).status_code == 200


def test_a_batch_s_idempotency_key_is_no_generate_s(svc: Service) -> None:
    key = {"Idempotency-Key": "k-batch", **svc.op()}
    assert svc.client.post("/batches", json={"seeds": [1, 2]}, headers=key).status_code == 202
    r = svc.client.post("/generate", json={"seeds": [1]}, headers=key)
    assert r.status_code == 409 and "batch request" in r.json()["detail"], r.text
    key = {"Idempotency-Key": "k-generate", **svc.op()}
    assert svc.client.post("/generate", json={"seeds": [5]}, headers=key).status_code == 202
    r = svc.client.post("/batches", json={"seeds": [5]}, headers=key)
    assert r.status_code == 409 and "generate request" in r.json()["detail"], r.text


def test_a_replayed_request_past_a_limit_is_still_a_422(svc: Service) -> None:
    key = {"Idempotency-Key": "k", **svc.op()}
    assert svc.client.post("/batches", json={"seeds": [1]}, headers=key).status_code == 202
    over = svc.settings.max_verify_top_k + 1
    for body in ({"seeds": [1], "attribute": {"verify_top_k": over}}, {"seeds": [1], "steps": 10**6}):
        r = svc.client.post("/batches", json=body, headers=key)
        assert r.status_code == 422, r.text
