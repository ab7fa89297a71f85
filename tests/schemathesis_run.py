"""One schemathesis engine run against a served API, in a process of its own.

Kept apart from the test module so that a spawned process imports only schemathesis: the
five credentials' runs go to a process pool, because the engine's threads are not safe here
(CPython 3.11's ast.parse, used by pytest's assertion rewriting and hypothesis' reprs, fails
with "AST constructor recursion depth mismatch" when two threads parse at once)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.recorder import Interaction

PHASES = ("examples", "coverage", "fuzzing")
SCHEMATHESIS = {
    "seed": 16,
    "generation": {"mode": "all", "max-examples": 10, "deterministic": True, "database": "none"},
    "checks": {"enabled": True},
    "suppress-health-check": ["all"],
    "cache": {"enabled": False},  # nothing learnt from an earlier run: each run the same
}


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


def run_schemathesis(url: str, headers: dict[str, str], phases: tuple[str, ...]) -> Run:
    config = SchemathesisConfig.from_dict({
        **SCHEMATHESIS, "headers": headers,
        "phases": {**{name: {"enabled": name in phases} for name in PHASES}, "stateful": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
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
