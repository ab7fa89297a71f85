"""The rate limit of the POST routes (app.deps.RateLimiter), on the app's injectable clock: a key
past its burst gets 429 with a Retry-After (whole seconds, rounded up) naming the settings, other
keys are not held back, and once Retry-After has passed on the clock the key's request goes
through again (no sleeping)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from app.auth import create_key
from tests.service.conftest import Service

MISSING_GENERATION = {"generation_id": 999_999}
"""POST /attribute of a generation that does not exist: 404 once past the limit (nothing queued)."""


def test_a_key_past_its_rate_waits_retry_after_on_the_clock(make_service: Callable[..., Service]) -> None:
    now = 1000.0
    # 7 per minute: one request's worth every 60/7 = 8.57 s, so Retry-After rounds up to 9.
    svc = make_service(rate_limit_per_minute=7, rate_limit_burst=2, clock=lambda: now)
    with svc.db.session() as s:
        _, second_operator = create_key(s, None, "second operator")

    def attribute(key: str) -> httpx.Response:
        return svc.client.post("/attribute", json=MISSING_GENERATION,
                               headers={"Authorization": f"Bearer {key}"})

    key = svc.operator_key
    assert [attribute(key).status_code for _ in range(2)] == [404, 404]  # the burst
    refused = attribute(key)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "9"
    detail = refused.json()["detail"]
    assert "rate_limit_burst" in detail and "rate_limit_per_minute" in detail
    assert attribute(second_operator).status_code == 404  # a bucket per key
    assert "retry-after" not in attribute(second_operator).headers

    now += 8.0  # not yet: 8 s refill 0.93 of a request
    early = attribute(key)
    assert early.status_code == 429 and early.headers["retry-after"] == "1"
    now += 1.0  # Retry-After (9 s) after the refusal: the request goes through
    assert attribute(key).status_code == 404
    again = attribute(key)  # and the bucket is empty again
    assert again.status_code == 429 and again.headers["retry-after"] == "9"
