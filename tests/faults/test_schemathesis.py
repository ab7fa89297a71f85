"""Hostile input: schemathesis against the app's own OpenAPI schema, all default checks, for
every operation, as an operator, as a rights holder, with a forged key and with none. Zero
failures allowed (a failure raises with schemathesis' report)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.service.conftest import Service

EXAMPLES = 12


@pytest.mark.parametrize("who", ["operator", "rights-holder", "forged-key", "no-key"])
def test_every_operation(make_service: Callable[..., Service], who: str) -> None:
    svc = make_service(rate_limit_per_minute=0, max_batch_seeds=20, max_seeds_per_request=8)
    headers = {"operator": svc.op(), "rights-holder": {"Authorization": f"Bearer {svc.owner_keys['alice']}"},
               "forged-key": {"Authorization": "Bearer attrib_000000000000_forged"}, "no-key": {}}[who]
    schema = schemathesis.openapi.from_asgi("/openapi.json", svc.client.app)
    ops = [r.ok() for r in schema.get_all_operations()]  # type: ignore[union-attr]  # an Err fails here
    assert len(ops) >= 17
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers)

        check()
