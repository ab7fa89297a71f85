"""The FastAPI application: ``create_app(settings)``; ``app.main:app`` for uvicorn."""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.routing import compile_path

from app import jobs
from app.db import Database
from app.deps import BodyCache, Clock, KeyCache, RateLimiter, ReadPool, TTLCache, Withdrawals
from app.orm import Job
from app.queue import make_celery
from app.routes import attributions, batches, generations, health, opt_outs, shares, validations, works
from app.routes import jobs as jobs_routes
from app.schemas import ErrorPublic
from app.settings import Settings, get_settings
from app.web import routes as web
from app.web.sessions import WebUser
from app.writer import Writer

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """413 for a body over ``limit`` bytes, by Content-Length or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = JSONResponse({"detail": f"request body is over the limit max_body_bytes={self.limit}"},
                            status_code=413)
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


class AllowedMethods:
    """A 405 names in ``Allow`` every method its path serves (RFC 9110), as the OpenAPI schema
    documents them. Starlette lists only the methods of the first route whose path matched:
    ``OPTIONS /validations`` said ``Allow: POST`` although GET is served there too."""

    def __init__(self, app: ASGIApp, paths: Callable[[], dict[str, Any]]) -> None:
        self.app, self.paths = app, paths
        self._methods: list[tuple[re.Pattern[str], str]] | None = None

    def allowed(self, path: str) -> str | None:
        if self._methods is None:  # the schema is complete once requests arrive
            self._methods = [(compile_path(template)[0], ", ".join(sorted(m.upper() for m in ops)))
                             for template, ops in self.paths().items()]
        return next((methods for regex, methods in self._methods if regex.match(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_allow(msg: Message) -> None:
            if msg["type"] == "http.response.start" and msg["status"] == 405:
                allowed = self.allowed(scope["path"])
                if allowed is not None:  # else a route outside the schema (/docs): Starlette's is right
                    headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"allow"]
                    msg = {**msg, "headers": [*headers, (b"allow", allowed.encode())]}
            await send(msg)

        await self.app(scope, receive, send_allow)


class Measure:
    """Request count and latency by method, route template and status (plain ASGI: cheap)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - t0)


class JobCounts(Collector):
    """``attrib_jobs{kind, status}``: job counts read from the database at every scrape (the
    same in every API process, so not a per-process metric)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("attrib_jobs", "jobs by kind and status", labels=["kind", "status"])
        try:
            with self.db.session() as s:
                rows = s.execute(select(Job.kind, Job.status, func.count())
                                 .group_by(Job.kind, Job.status)).all()
        except Exception as exc:  # metrics must answer while the database is down
            log.warning("metrics: %s", exc)
            rows = []
        for kind, status, n in rows:
            family.add_metric([kind, status], n)
        yield family


class Metrics:
    """The API's Prometheus metrics.

    With several API processes (``attrib serve --api-processes N``), ``PROMETHEUS_MULTIPROC_DIR``
    is set and prometheus_client keeps every value in a file per process; ``latest()`` then sums
    all processes, whichever one answers the scrape.
    """

    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.requests = Counter("attrib_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("attrib_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.requeued = Counter("attrib_jobs_resent_total", "lost jobs re-sent by the reaper",
                                registry=self.registry)
        self.writes = Gauge("attrib_writes", "writing requests committed by the API, and the "
                            "transactions that carried them (group commit)", ["what"],
                            registry=self.registry, multiprocess_mode="livesum")
        for what in ("requests", "transactions"):
            self.writes.labels(what)
        self.job_counts = JobCounts(db)
        if not self.multiprocess:
            self.registry.register(self.job_counts)

    def committed(self, requests: int) -> None:
        """The writer committed one transaction carrying ``requests`` writing requests."""
        self.writes.labels("requests").inc(requests)
        self.writes.labels("transactions").inc()

    def latest(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.job_counts)
        return generate_latest(registry)


def _reaper(app: FastAPI, stop: threading.Event) -> None:
    st = app.state
    while not stop.wait(st.settings.reaper_interval_s):
        try:
            n = len(jobs.requeue_lost(st.db, st.celery, st.settings))
            if n:
                st.metrics.requeued.inc(n)
        except Exception as exc:  # database or broker down: try again next period
            log.warning("reaper: %s", exc)


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Put this deployment's limits (settings) into the OpenAPI schema, so clients and
    schema-driven tests know them: maxItems of seeds, maximum of counts, steps, top_k, page sizes."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        comps = schema["components"]["schemas"]

        def cap(model: str, field: str, key: str, value: int) -> None:
            prop = comps[model]["properties"][field]
            for branch in prop.get("anyOf", [prop]):
                if branch.get("type") in ("integer", "array"):
                    branch[key] = value

        for model, most in (("GenerateCreate", settings.max_seeds_per_request),
                            ("BatchCreate", settings.max_batch_seeds)):
            cap(model, "seeds", "maxItems", most)
            cap(model, "count", "maximum", most)
            cap(model, "steps", "maximum", settings.max_steps)
        for model in ("ClassesValidation", "FidelityValidation", "CopiesValidation"):
            cap(model, "samples", "maximum", settings.max_validation_samples)
            cap(model, "steps", "maximum", settings.max_steps)
        cap("TrainOptions", "train_steps", "maximum", settings.max_validation_train_steps)
        for model in ("AttributeCreate", "AttributeOptions"):
            cap(model, "top_k", "maximum", settings.max_top_k)
            cap(model, "verify_top_k", "maximum", settings.max_verify_top_k)
        for ops in schema["paths"].values():
            for op in ops.values():
                for prm in op.get("parameters", []):
                    if prm["in"] == "query" and prm["name"] == "limit":
                        prm["schema"]["maximum"] = settings.max_page_size
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}
# Answers any operation can give, by what it takes: documented on every operation they apply to,
# so that clients and schema-driven tests know every status (routers add their own: 404, 409...).
BODY_ERRORS = {400: "the body is not valid JSON text (e.g. not UTF-8)",
               422: "invalid request, or past a limit (named in the message)"}
PARAMETER_ERRORS = {422: "invalid request, or past a limit (named in the message)"}
AUTH_ERRORS = {401: "missing, invalid or revoked API key"}
EVERY_OPERATION_ERRORS = {413: "body larger than max_body_bytes"}


def _document_errors(app: FastAPI) -> None:
    """Add the answers of BodyLimit, FastAPI's body parsing and validation, and authentication
    to every operation they apply to (as ErrorPublic), unless the route documents them itself."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema["components"]["schemas"].setdefault("ErrorPublic", ErrorPublic.model_json_schema())
        for ops in schema["paths"].values():
            for op in ops.values():
                errors = dict(EVERY_OPERATION_ERRORS)
                if op.get("parameters"):
                    errors |= PARAMETER_ERRORS
                if "requestBody" in op:
                    errors |= BODY_ERRORS
                if op.get("security"):
                    errors |= AUTH_ERRORS
                responses = op.setdefault("responses", {})
                for status, why in errors.items():
                    responses.setdefault(str(status), {"description": why, "content": ERROR_REF})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, celery: Celery | None = None,
               clock: Clock = time.monotonic) -> FastAPI:
    """The API; ``clock`` times its caches and rate limits (a test passes its own, not sleeps)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything imported so far (torch too, via the CLI) lives as long as the process:
        # move it out of the collector's sight, or each full collection walks it (measured:
        # periodic 200-300 ms stalls of every request at 64 req/s).
        gc.collect()
        gc.freeze()
        stop = threading.Event()
        t = None
        if settings.reaper_interval_s > 0:
            t = threading.Thread(target=_reaper, args=(app, stop), name="reaper", daemon=True)
            t.start()
        yield
        stop.set()
        if t is not None:
            t.join(timeout=5)
        app.state.db.dispose()

    app = FastAPI(
        title="Attribution service for diffusion models",
        version="0.1.0",
        description=(
            "Which training works shaped a generated image, what it would look like without them, "
            "and, for each rights holder, where their works were used. Built on encoded ensembles "
            "(Dai, Yew, Gifford). Authenticate with `Authorization: Bearer <key>` or `X-API-Key`: "
            "operator keys for generation and attribution, a rights holder's key for `/works`. "
            "Long work runs as jobs: a POST answers 202 with a job id to poll at `/jobs/{id}`. "
            "Errors are JSON `{\"detail\": ...}`; a request past a limit gets a 4xx naming the limit."),
        lifespan=lifespan,
        docs_url=None,  # app.web serves /docs with Swagger UI's files from the app, not from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = Database(settings.database_url)
    app.state.celery = celery or make_celery(settings)
    app.state.key_cache = KeyCache(settings.auth_cache_s, clock=clock)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst,
                                         clock=clock)
    # A finished ranking never changes, but for the withdrawal marks of its entries (opt-outs):
    # the count of withdrawals is part of a cached ranking's key, re-read every influence_cache_s.
    app.state.ranking_cache = BodyCache(math.inf, size=2048)
    app.state.withdrawals = Withdrawals(settings.influence_cache_s, clock=clock)
    app.state.metrics = metrics = Metrics(app.state.db)
    app.state.writer = Writer(app.state.db, app.state.celery, on_commit=metrics.committed)
    app.state.reads = ReadPool(settings.read_threads)
    app.state.influence_cache = BodyCache(settings.influence_cache_s, clock=clock)
    # the pages' sessions (revocation and expiry seen within auth_cache_s, as for API keys) and a
    # holder's pages per session and URL (reused like an influence page)
    app.state.web_sessions = TTLCache[WebUser](settings.auth_cache_s, clock=clock)
    app.state.web_pages = BodyCache(settings.influence_cache_s, clock=clock)


    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(DBAPIError)
    async def db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "database unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": "5"})

    for resource in (generations, attributions, shares, jobs_routes, batches, validations, works, opt_outs,
                     health):
        app.include_router(resource.router)
    web.install(app)
    _document_limits(app, settings)
    _document_errors(app)

    app.add_middleware(AllowedMethods, paths=lambda: app.openapi()["paths"])
    app.add_middleware(Measure, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # outermost: before any parsing
    return app


def __getattr__(name: str) -> Any:
    """``app.main:app`` builds the application from the environment on first use."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
