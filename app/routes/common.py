"""What every router shares: documented error answers, path and query parameters, limits, PNGs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, HTTPException, Path, Query, Response

from app.pictures import MAX_SCALE, rescale_png
from app.schemas import MAX_ID, ErrorPublic
from app.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "missing, invalid or revoked API key"},
    403: {"model": ErrorPublic, "description": "a rights holder's key on an operator route"},
    404: {"model": ErrorPublic, "description": "no such object"},
    409: {"model": ErrorPublic, "description": "conflicts with the current state (an ensemble not ready, "
          "steps past its T, an Idempotency-Key in use)"},
    413: {"model": ErrorPublic, "description": "body larger than max_body_bytes"},
    422: {"model": ErrorPublic, "description": "invalid request, or past a limit (named in the message)"},
    429: {"model": ErrorPublic, "description": "rate limit of the key exceeded (POST routes): Retry-After"},
    503: {"model": ErrorPublic, "description": "the database is unavailable"},
}
PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}

IdempotencyKey = Annotated[str | None, Header(max_length=200, description=(
    "optional: a retried request with the same key returns the first request's job"))]
PathId = Annotated[int, Path(ge=1, le=MAX_ID, description="an id")]
JobId = Annotated[str, Path(max_length=36, description="a job id (UUID)")]
Scale = Annotated[int, Query(ge=1, le=MAX_SCALE, description="integer upscaling (nearest neighbour)")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")]
PageSize = Annotated[int, Query(alias="limit", ge=1, description="page size; at most max_page_size")]


def check_limit(name: str, value: int, settings: Settings, what: str) -> None:
    """422 naming the setting when ``value`` is over ``settings.<name>``."""
    cap = int(getattr(settings, name))
    if value > cap:
        raise HTTPException(422, f"{what} {value} is over the limit {name}={cap}")


def png_response(png: bytes, scale: int = 1) -> Response:
    return Response(rescale_png(png, scale), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})
