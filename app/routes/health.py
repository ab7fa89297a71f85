"""Health: liveness, readiness (naming the dependency that is down) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])


def _why(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first}"


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker reachable",
            responses={503: {"description": "a dependency is down; `failed` names it"}})
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        state.db.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = _why(exc)
    try:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = _why(exc)
    failed = [name for name, verdict in checks.items() if verdict != "ok"]
    return JSONResponse({"status": "ready" if not failed else "unavailable", "failed": failed,
                         "checks": checks}, status_code=503 if failed else 200)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.latest(), media_type=CONTENT_TYPE_LATEST)
