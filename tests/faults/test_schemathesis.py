"""Hostile input: schemathesis' own engine (what `schemathesis run --checks all` runs) against the
app's OpenAPI schema, in-process, as an operator, as a rights holder (both header forms), with a
forged key and with none. Its examples, coverage (boundary values, wrong types, missing and
malformed parameters, unsupported methods) and fuzzing phases send schema-valid and schema-violating
requests, and every check judges the answers. Zero failures allowed. Bounded and repeatable: a
fixed seed, deterministic generation, a few fuzzed examples per operation.

Below it, what the engine found once, pinned as plain requests (so a regression names itself)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.recorder import Interaction

from tests.service.conftest import Service

SCHEMATHESIS = {
    "seed": 16,
    "generation": {"mode": "all", "max-examples": 10, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
               "stateful": {"enabled": False}},
    "checks": {"enabled": True},
    "suppress-health-check": ["all"],
    "cache": {"enabled": False},  # nothing learnt from an earlier run: each run the same
}
FORGED = "attrib_000000000000_forged"


def credentials(svc: Service, who: str) -> dict[str, str]:
    return {"operator": svc.op(),
            "rights-holder-bearer": {"Authorization": f"Bearer {svc.owner_keys['alice']}"},
            "rights-holder-x-api-key": {"X-API-Key": svc.owner_keys["alice"]},
            "forged-key": {"Authorization": f"Bearer {FORGED}"},
            "no-key": {}}[who]


@dataclass
class Run:
    operations: set[str] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)
    negative: int = 0
    cases: int = 0
    failures: list[str] = field(default_factory=list)


def exchange(sent: Interaction | None) -> str:
    if sent is None:
        return "  (no request recorded)"
    answer = sent.response
    got = f"{answer.status_code} {(answer.content or b'')[:300]!r}" if answer is not None else "nothing"
    body = (sent.request.body or b"")[:300]
    return f"  sent: {sent.request.method} {sent.request.uri} {body!r}\n  got: {got}"


def run_schemathesis(svc: Service, headers: dict[str, str]) -> Run:
    config = SchemathesisConfig.from_dict({**SCHEMATHESIS, "headers": headers})
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.client.app, config=config)
    run = Run()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            rec = event.recorder
            run.operations.add(rec.label)
            for case_id, node in rec.cases.items():
                run.cases += 1
                meta = node.value.meta
                run.negative += bool(meta is not None and meta.generation.mode.is_negative)
                if case_id in rec.interactions:
                    run.methods.add(rec.interactions[case_id].request.method)
            for case_id, checks in rec.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        why = f"{check.name}: {check.failure_info.failure.message}"
                        run.failures.append(f"[{event.phase}] {rec.label}: {why}\n"
                                            f"{exchange(rec.interactions.get(case_id))}")
        elif isinstance(event, events.NonFatalError):
            run.failures.append(f"[{event.phase}] {event.label}: error in the app or the run:\n"
                                + "".join(traceback.format_exception(event.value))[-3000:])
        elif isinstance(event, events.FatalError):
            run.failures.append("schemathesis failed:\n"
                                + "".join(traceback.format_exception(event.exception)))
    return run


@pytest.mark.parametrize("who", ["operator", "rights-holder-bearer", "rights-holder-x-api-key", "forged-key",
                                 "no-key"])
def test_every_operation_every_check(make_service: Callable[..., Service], who: str) -> None:
    svc = make_service(rate_limit_per_minute=0, max_batch_seeds=20, max_seeds_per_request=8)
    run = run_schemathesis(svc, credentials(svc, who))
    assert not run.failures, f"{len(run.failures)} failure(s):\n\n" + "\n\n".join(dict.fromkeys(run.failures))
    # It did run what it says: every operation, hostile data, methods the schema does not list.
    paths = svc.client.get("/openapi.json").json()["paths"]
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
