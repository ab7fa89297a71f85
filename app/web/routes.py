"""The web pages under /web, and /docs with Swagger UI's assets served by the app.

Every page is rendered on the server (Jinja2, autoescaped) and works without JavaScript. A
rights holder sees only their works (anything else is the 404 page, never a 403 that would
confirm an id); an operator sees attributions, jobs and validations. Pages reuse the JSON
routes' functions, so both say the same thing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import shares
from app.auth import hash_key
from app.db import Database
from app.deps import BodyCache, TTLCache
from app.orm import Attribution, Image, Job, TrainingItem
from app.routes import generations, validations, works
from app.routes import shares as share_routes
from app.routes.attributions import attribution_public, get_counterfactual
from app.schemas import MAX_ID
from app.web import sessions
from app.web.charts import share_chart
from app.web.sessions import WebUser

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
SWAGGER_UI = Path(fastapi_offline.__file__).resolve().parent / "static"
"""Swagger UI 5 (swagger-ui-bundle.js, swagger-ui.css), as packaged by fastapi-offline (whose own
page would need an inline script: only its files are used)."""
TEMPLATES = Jinja2Templates(directory=HERE / "templates")
CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# Swagger UI's stylesheet draws its icons from data: URIs (inline images, nothing fetched).
DOCS_CSP = CSP.replace("img-src 'self'", "img-src 'self' data:")
GALLERY_SIZE = 24
ROWS_SIZE = 20
CHART_DAYS = 30

router = APIRouter(prefix="/web", include_in_schema=False)


class SignInRequired(Exception):
    """No valid session: the browser goes to the sign-in page."""


class PageNotFound(Exception):
    """The 404 page: absent, or not the caller's."""


class FormRefused(Exception):
    """A form without its session's CSRF token (forged, or from a page of an earlier session)."""


def secured(resp: Response, csp: str = CSP) -> Response:
    resp.headers["Content-Security-Policy"] = csp
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    if resp.media_type == "text/html":
        resp.headers["Cache-Control"] = "no-store"
    return resp


def render(request: Request, template: str, user: WebUser | None, status: int = 200,
           **context: Any) -> Response:
    resp = TEMPLATES.TemplateResponse(request, template, {"user": user, **context}, status_code=status)
    return secured(resp)


async def _read(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the app's read threads; a 404 from it becomes the 404 page."""
    try:
        return await request.app.state.reads.run(fn, *args)  # type: ignore[no-any-return]
    except HTTPException as exc:
        if exc.status_code == 404:
            raise PageNotFound(str(exc.detail)) from exc
        raise


def _in_session(db: Database, fn: Callable[[Session], T]) -> T:
    with db.session() as s:
        return fn(s)


async def _with_session(request: Request, fn: Callable[[Session], T]) -> T:
    return await _read(request, _in_session, request.app.state.db, fn)


async def web_user(request: Request) -> WebUser:
    token = request.cookies.get(sessions.COOKIE)
    if not token:
        raise SignInRequired
    cache: TTLCache[WebUser] = request.app.state.web_sessions
    user = cache.get(hash_key(token))
    if user is None:
        user = await request.app.state.reads.run(sessions.current, request.app.state.db, token)
        if user is None:
            raise SignInRequired
        cache.put(hash_key(token), user)
    return user


async def cached_page(request: Request, build: Callable[[], Awaitable[Response]]) -> Response:
    """A holder's page as ``build`` renders it, reused for ``influence_cache_s`` per session and
    URL (as GET /works/{id}/influence is): a new attribution shows up within that time. While one
    request renders a page, the others asking for it wait for that rendering instead of each
    rendering it again (when the page expires under load, all its readers miss at once)."""
    cache: BodyCache = request.app.state.web_pages
    rendering: dict[Hashable, asyncio.Future[bytes | None]] = request.app.state.web_pages_rendering
    key = (hash_key(request.cookies.get(sessions.COOKIE, "")), request.url.path, request.url.query)
    body = cache.get(key)
    if body is None and key in rendering:
        body = await asyncio.shield(rendering[key])
    if body is not None:
        return secured(HTMLResponse(body))
    done: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
    rendering[key] = done
    body = None
    try:
        resp = await build()
        if resp.status_code == 200:
            body = bytes(resp.body)
            cache.put(key, body)
        return resp
    finally:
        done.set_result(body)  # None: the waiting requests render it themselves (an error page)
        rendering.pop(key, None)


async def holder(user: Annotated[WebUser, Depends(web_user)]) -> WebUser:
    if user.is_operator:
        raise PageNotFound("rights holders' page")
    return user


async def operator(user: Annotated[WebUser, Depends(web_user)]) -> WebUser:
    if not user.is_operator:
        raise PageNotFound("operators' page")
    return user


HolderUser = Annotated[WebUser, Depends(holder)]
OperatorUser = Annotated[WebUser, Depends(operator)]


def object_id(raw: str) -> int:
    """A path's id, or the 404 page (a page URL with a bad id is a page that does not exist)."""
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ID:
        raise PageNotFound(f"no page for id {raw!r}")
    return int(raw)


def page_number(raw: str | None) -> int:
    return int(raw) if raw and raw.isdigit() and 1 <= int(raw) <= 10**6 else 1


class Pager:
    """Page ``number`` of ``total`` items, ``size`` per page."""

    def __init__(self, number: int, size: int, total: int) -> None:
        self.number, self.size, self.total = number, size, total
        self.pages = max(1, math.ceil(total / size))

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    @property
    def previous(self) -> int | None:
        return self.number - 1 if self.number > 1 else None

    @property
    def next(self) -> int | None:
        return self.number + 1 if self.number < self.pages else None


def _png(resp: Response) -> Response:
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def check_form(user: WebUser, csrf_token: str | None) -> None:
    if not sessions.same_token(csrf_token, user.csrf_token):
        raise FormRefused


# ------------------------------------------------------------------------- sign in and out
@router.get("")
async def home(request: Request) -> Response:
    try:
        user = await web_user(request)
    except SignInRequired:
        return secured(RedirectResponse("/web/sign-in", 303))
    return secured(RedirectResponse("/web/attributions" if user.is_operator else "/web/works", 303))


def _cookie(resp: Response, request: Request, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, max_age=max_age, path="/web", httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")


@router.get("/sign-in")
async def sign_in_page(request: Request, signed_out: str | None = None) -> Response:
    token = request.cookies.get(sessions.SIGN_IN_COOKIE) or sessions.new_token()
    resp = render(request, "sign_in.html", None, csrf_token=token, signed_out=signed_out is not None)
    _cookie(resp, request, sessions.SIGN_IN_COOKIE, token, 3600)
    return resp


@router.post("/sign-in")
async def sign_in(request: Request, key: Annotated[str, Form(max_length=500)] = "",
                  csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    if not sessions.same_token(csrf_token, request.cookies.get(sessions.SIGN_IN_COOKIE)):
        raise FormRefused
    st = request.app.state
    token = await st.reads.run(sessions.sign_in, st.db, key, st.settings.operator_key,
                               st.settings.web_session_s)
    if token is None:
        return render(request, "sign_in.html", None, status=401, csrf_token=csrf_token, signed_out=False,
                      error="That key is not valid, or it was revoked.")
    resp = RedirectResponse("/web", 303)
    _cookie(resp, request, sessions.COOKIE, token, int(st.settings.web_session_s))
    resp.delete_cookie(sessions.SIGN_IN_COOKIE, path="/web")
    return secured(resp)


@router.post("/sign-out")
async def sign_out(request: Request, user: Annotated[WebUser, Depends(web_user)],
                   csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    check_form(user, csrf_token)
    token = request.cookies.get(sessions.COOKIE)
    await request.app.state.reads.run(sessions.sign_out, request.app.state.db, token)
    # this process forgets the session at once, the others within auth_cache_s
    request.app.state.web_sessions.discard(hash_key(token or ""))
    resp = RedirectResponse("/web/sign-in?signed_out", 303)
    resp.delete_cookie(sessions.COOKIE, path="/web")
    return secured(resp)


# ------------------------------------------------------------------------- rights holders
def _gallery(db: Database, owner_id: int, number: int) -> tuple[list[TrainingItem], Pager]:
    with db.session() as s:
        total = s.scalar(select(func.count()).select_from(TrainingItem)
                         .where(TrainingItem.owner_id == owner_id)) or 0
        pager = Pager(number, GALLERY_SIZE, total)
        items = list(s.scalars(select(TrainingItem).where(TrainingItem.owner_id == owner_id)
                               .order_by(TrainingItem.id).offset(pager.offset).limit(GALLERY_SIZE)))
        s.expunge_all()
    return items, pager


@router.get("/works")
async def gallery(request: Request, user: HolderUser, page: str | None = None) -> Response:
    owner_id = user.principal.owner_id
    assert owner_id is not None

    async def build() -> Response:
        items, pager = await _read(request, _gallery, request.app.state.db, owner_id, page_number(page))
        return render(request, "gallery.html", user, works=items, pager=pager)

    return await cached_page(request, build)


def _work(db: Database, user: WebUser, work_id: int, number: int) -> dict[str, Any]:
    p = user.principal
    assert p.owner_id is not None
    with db.session() as s:
        item = works.own_work(s, p, work_id)
        s.expunge(item)
    first = works.influence_page(db, p, work_id, (number - 1) * ROWS_SIZE, ROWS_SIZE)
    pager = Pager(number, ROWS_SIZE, first.total)
    with db.reads.connect() as c:
        mine = shares.holder_share_in(c, p.owner_id, [r.attribution_id for r in first.items])
    return {"work": item, "rows": first.items, "pager": pager, "share_of": mine}


@router.get("/works/{work_id}")
async def work_page(request: Request, work_id: str, user: HolderUser, page: str | None = None) -> Response:
    async def build() -> Response:
        context = await _read(request, _work, request.app.state.db, user, object_id(work_id),
                              page_number(page))
        return render(request, "work.html", user, **context)

    return await cached_page(request, build)


@router.get("/works/{work_id}/image.png")
async def work_image(request: Request, work_id: str, user: HolderUser) -> Response:
    wid = object_id(work_id)
    return _png(await _with_session(request, lambda s: works.get_work_image(wid, user.principal, s)))


@router.get("/works/{work_id}/influence/{attribution_id}/{picture}.png")
async def influence_image(request: Request, work_id: str, attribution_id: str, picture: str,
                          user: HolderUser) -> Response:
    wid, aid = object_id(work_id), object_id(attribution_id)
    pictures = {"generation": works.get_influenced_generation,
                "counterfactual": works.get_influenced_counterfactual}
    if picture not in pictures:
        raise PageNotFound(picture)
    show = pictures[picture]
    return _png(await _with_session(request, lambda s: show(wid, aid, user.principal, s)))


def _shares(db: Database, owner_id: int, number: int) -> dict[str, Any]:
    with db.reads.connect() as c:
        items, total = shares.holder_shares(c, owner_id, (number - 1) * ROWS_SIZE, ROWS_SIZE)
        days = shares.holder_days(c, owner_id, CHART_DAYS)
    return {"rows": items, "pager": Pager(number, ROWS_SIZE, total), "days": days}


@router.get("/shares")
async def shares_page(request: Request, user: HolderUser, page: str | None = None) -> Response:
    owner_id = user.principal.owner_id
    assert owner_id is not None

    async def build() -> Response:
        context = await _read(request, _shares, request.app.state.db, owner_id, page_number(page))
        return render(request, "shares.html", user, chart=share_chart(context["days"], user.name), **context)

    return await cached_page(request, build)


# ------------------------------------------------------------------------------ operators
def _attributions(db: Database, number: int) -> tuple[list[Any], Pager]:
    with db.reads.connect() as c:
        total = c.scalar(select(func.count()).select_from(Attribution)) or 0
        pager = Pager(number, ROWS_SIZE, total)
        rows = c.execute(select(Attribution.id, Attribution.generation_id, Attribution.method,
                                Attribution.metric,
                                Attribution.top_k, Attribution.verify_top_k, Attribution.status,
                                Attribution.created_at)
                         .order_by(Attribution.id.desc()).offset(pager.offset).limit(ROWS_SIZE)).all()
    return list(rows), pager


@router.get("/attributions")
async def attributions_page(request: Request, user: OperatorUser, page: str | None = None) -> Response:
    rows, pager = await _read(request, _attributions, request.app.state.db, page_number(page))
    return render(request, "attributions.html", user, rows=rows, pager=pager)


def _attribution(s: Session, attribution_id: int) -> dict[str, Any]:
    att = s.get(Attribution, attribution_id)
    if att is None:
        raise HTTPException(404, f"attribution {attribution_id} not found")
    public = attribution_public(s, att)
    by_owner = shares.attribution_shares(s, attribution_id) if att.status == "succeeded" else None
    requested = {}
    if by_owner is not None:
        keys = {share_routes.counterfactual_key(attribution_id, o.owner_id): o.owner_id
                for o in by_owner.shares if o.owner_id is not None}
        for job in s.scalars(select(Job).where(Job.idempotency_key.in_(list(keys)))):
            requested[keys[str(job.idempotency_key)]] = job
        s.expunge_all()
    return {"attribution": public, "shares": by_owner, "requested": requested}


@router.get("/attributions/{attribution_id}")
async def attribution_page(request: Request, attribution_id: str, user: OperatorUser) -> Response:
    aid = object_id(attribution_id)
    context = await _with_session(request, lambda s: _attribution(s, aid))
    return render(request, "attribution.html", user, **context)


@router.post("/attributions/{attribution_id}/shares/{owner_id}/counterfactual")
async def request_owner_counterfactual(request: Request, attribution_id: str, owner_id: str,
                                       user: OperatorUser,
                                       csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    check_form(user, csrf_token)
    aid, oid = object_id(attribution_id), object_id(owner_id)
    min_members = request.app.state.settings.owner_counterfactual_min_members
    try:
        await request.app.state.writer.run(
            lambda tx: share_routes._owner_counterfactual(tx, aid, oid, min_members))
    except HTTPException as exc:
        if exc.status_code == 404:
            raise PageNotFound(str(exc.detail)) from exc
        context = await _with_session(request, lambda s: _attribution(s, aid))
        return render(request, "attribution.html", user, status=exc.status_code, refused=str(exc.detail),
                      **context)
    return secured(RedirectResponse(f"/web/attributions/{aid}", 303))


@router.get("/attributions/{attribution_id}/shares/{owner_id}/counterfactual.png")
async def owner_counterfactual_image(request: Request, attribution_id: str, owner_id: str,
                                     user: OperatorUser) -> Response:
    aid, oid = object_id(attribution_id), object_id(owner_id)
    png = await _with_session(request, lambda s: share_routes.owner_counterfactual_png(s, aid, oid))
    return _png(Response(png, media_type="image/png"))


@router.get("/attributions/{attribution_id}/counterfactual/{item_id}.png")
async def counterfactual_image(request: Request, attribution_id: str, item_id: str,
                               user: OperatorUser) -> Response:
    aid, iid = object_id(attribution_id), object_id(item_id)
    return _png(await _with_session(request, lambda s: get_counterfactual(aid, iid, user.principal, s)))


@router.get("/generations/{generation_id}/image.png")
async def generation_image(request: Request, generation_id: str, user: OperatorUser) -> Response:
    gid = object_id(generation_id)
    return _png(await _with_session(
        request, lambda s: generations.get_generation_image(gid, user.principal, s)))


def _item_png(s: Session, item_id: int) -> Response:
    item = s.get(TrainingItem, item_id)
    img = s.get(Image, item.image_sha) if item is not None else None
    if img is None:
        raise HTTPException(404, f"training item {item_id} not found")
    return Response(img.png, media_type="image/png")


@router.get("/items/{item_id}/image.png")
async def item_image(request: Request, item_id: str, user: OperatorUser) -> Response:
    iid = object_id(item_id)
    return _png(await _with_session(request, lambda s: _item_png(s, iid)))


def _jobs(db: Database, number: int) -> tuple[list[Any], Pager]:
    with db.reads.connect() as c:
        total = c.scalar(select(func.count()).select_from(Job)) or 0
        pager = Pager(number, ROWS_SIZE, total)
        rows = c.execute(select(Job.id, Job.kind, Job.status, Job.progress, Job.error, Job.attempts,
                                Job.created_at, Job.finished_at)
                         .order_by(Job.created_at.desc(), Job.id).offset(pager.offset).limit(ROWS_SIZE)).all()
    return list(rows), pager


@router.get("/jobs")
async def jobs_page(request: Request, user: OperatorUser, page: str | None = None) -> Response:
    rows, pager = await _read(request, _jobs, request.app.state.db, page_number(page))
    active = any(r.status in ("queued", "running") for r in rows)
    return render(request, "jobs.html", user, rows=rows, pager=pager, active=active)


@router.get("/validations")
async def validations_page(request: Request, user: OperatorUser, page: str | None = None) -> Response:
    number = page_number(page)
    settings = request.app.state.settings
    listed = await _with_session(request, lambda s: validations.list_validations(
        user.principal, s, settings, (number - 1) * ROWS_SIZE, ROWS_SIZE))
    return render(request, "validations.html", user, rows=listed.items,
                  pager=Pager(number, ROWS_SIZE, listed.total))


@router.get("/validations/{job_id}")
async def validation_page(request: Request, job_id: str, user: OperatorUser) -> Response:
    if len(job_id) > 36:
        raise PageNotFound(job_id)
    v = await _with_session(request, lambda s: validations.get_validation(job_id, user.principal, s))
    return render(request, "validation.html", user, v=v)


@router.get("/validations/{job_id}/figures/{name}")
async def validation_figure(request: Request, job_id: str, name: str, user: OperatorUser) -> Response:
    if len(job_id) > 36 or len(name) > 100:
        raise PageNotFound(job_id)
    return _png(await _with_session(
        request, lambda s: validations.get_validation_figure(job_id, user.principal, s, name)))


@router.get("/{anything:path}")
async def not_found(request: Request, anything: str) -> Response:
    raise PageNotFound(anything)


# ---------------------------------------------------------------------------------- docs
async def docs(request: Request) -> Response:
    """Swagger UI's files from the app, started by a script of ours (no inline script, nothing
    from the internet)."""
    return secured(TEMPLATES.TemplateResponse(request, "docs.html", {"title": request.app.title}), DOCS_CSP)


async def _page_for(request: Request, exc: Exception) -> Response:
    if isinstance(exc, SignInRequired):
        return secured(RedirectResponse("/web/sign-in", 303))
    user = None
    if not isinstance(exc, FormRefused):
        try:
            user = await web_user(request)
        except SignInRequired:
            user = None
    if isinstance(exc, FormRefused):
        return render(request, "refused.html", None, status=403)
    return render(request, "not_found.html", user, status=404)


def install(app: FastAPI) -> None:
    """Mount the pages, their static files, Swagger UI's assets and /docs on ``app`` (created
    with ``docs_url=None``, so that FastAPI's CDN-loading page is not served)."""
    # The mounts come first: the pages' catch-all 404 would otherwise answer for their files.
    app.mount("/web/static", StaticFiles(directory=HERE / "static"), name="web-static")
    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_UI), name="docs-assets")
    app.include_router(router)
    app.state.web_pages_rendering = {}  # cached_page: key -> the rendering in progress
    app.add_api_route("/docs", docs, include_in_schema=False, response_class=HTMLResponse)
    for exc in (SignInRequired, PageNotFound, FormRefused):
        app.add_exception_handler(exc, _page_for)
