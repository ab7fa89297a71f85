"""HTTP API under load on loopback: enqueue, ranking and influence latency at N concurrent clients.

Closed loop by default: each of --clients clients (one HTTP/1.1 keep-alive connection each, all
on one uvloop event loop; --client raw, the default, sends pre-built requests over asyncio
streams, --client httpx uses httpx.AsyncClient) sends requests back to back for
--duration seconds after --warmup seconds that are not counted; then mean latency is
clients / throughput, so it measures saturation. --rate R paces each client at R requests/s
instead (latency counted from the scheduled send time). Phases:

* enqueue: POST /generate {"seeds": [s], "steps": 1} with a fresh seed per request (each makes
  a new generation and job). The API's work does not depend on the steps; the worker's does: a
  run leaves some thousand one-step jobs queued (the embedded server's worker is paused while
  measuring, see --worker; with a kept data dir or database they are marked failed at the end);
* ranking: GET /attributions/{id} of a synthetic attribution with top_k=100 (100 entries; of a
  generation sampled with --setup-steps steps, to keep the setup's Jacobian cheap);
* influence: GET /works/{id}/influence with the key of the rights holder owning that work;
* gallery and work_page (embedded server only): the web pages of that rights holder, signed in
  through the sign-in form (a session cookie): GET /web/works (the first page of the gallery of
  the holder, who is given --works more works first) and GET /web/works/{id} (that work's page).

Against a running server: --url URL --operator-key KEY [--owner-key KEY] (a worker must run,
the setup samples one generation and attributes it). Without --url the bench starts its own:
a fresh temporary ATTRIB_DATA_DIR, ``attrib demo-setup --preset tiny --json`` (digits, 5 demo
rights holders, a tiny ensemble trained in seconds to a minute), then ``attrib serve --workers 1
--api-processes 2`` in its own process group, torn down at the end, with its filesystem
broker's folder in a fresh /dev/shm folder (--broker-dir; the messages are only wake-ups, the
jobs are in the database). --database-url/--broker-url are passed to that server (a PostgreSQL
URL without a database name gets a fresh database, dropped at the end). The server's CPU is
that of attrib serve and its HTTP processes, not of the worker.

Latency is measured by the client, so it includes the client's own event loop: on this
machine the load generator and the server share 2 CPU cores (each phase reports the CPU
share of client, server and other processes). p50/p99/max are over the requests answered
(any status); non-2xx answers and transport errors are counted apart. Prints one JSON
object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _common as C
import httpx

TARGETS_MS = {"enqueue_p99_ms": 50.0, "ranking_p99_ms": 30.0, "influence_p99_ms": 50.0,
              "gallery_p99_ms": 50.0, "work_page_p99_ms": 50.0}
TOP_K = 100
PHASES = ("ranking", "influence", "gallery", "work_page", "enqueue")
TICK = os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=C.HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="8 s per phase after 1 s of warm-up: under 60 s here, training excluded")
    p.add_argument("--url", default=None, help="a running server (default: start an embedded one)")
    p.add_argument("--operator-key", default=None, help="operator key (needed with --url)")
    p.add_argument("--owner-key", default=None,
                   help="a rights holder's key for the influence phase (with --url; without it, "
                        "the influence phase is skipped)")
    p.add_argument("--clients", default="32",
                   help="concurrent clients; a comma-separated list measures each level, e.g. 32,128")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per phase and level (default 30; 8 with --quick)")
    p.add_argument("--warmup", type=float, default=None,
                   help="uncounted seconds before each phase (default 3; 1 with --quick)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="requests/s per client on a fixed schedule (latency from the scheduled time); "
                        "0 = closed loop, each client back to back (default)")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator: raw = pre-built requests over asyncio streams (~0.1 ms of "
                        "client CPU per request, so the server is what is measured); httpx = "
                        "httpx.AsyncClient (~0.8-1 ms, the client then bounds the throughput here)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    p.add_argument("--memory-jobs", type=int, default=0,
                   help="then run this many jobs through the (embedded) worker and report the API's "
                        "and the worker's resident memory along the way (e.g. 500)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=None,
                   help="first seed of this run's generations (default: random, so every request "
                        "creates a new generation even against a server used before)")
    p.add_argument("--setup-timeout", type=float, default=600.0,
                   help="seconds to wait for the setup's generation and attribution jobs")
    g = p.add_argument_group("embedded server (no --url)")
    g.add_argument("--database-url", default=None,
                   help="DATABASE_URL for the server (default: SQLite in the data dir); "
                        "postgresql+psycopg://USER@HOST:PORT/ with no database name: a fresh one")
    g.add_argument("--broker-url", default=None,
                   help="BROKER_URL for the server (default: the filesystem broker in the data dir)")
    g.add_argument("--data-dir", default=None,
                   help="use (and keep) this ATTRIB_DATA_DIR instead of a fresh temporary one: a "
                        "second run skips the training")
    g.add_argument("--preset", default="tiny", help="network preset for attrib demo-setup")
    g.add_argument("--broker-dir", choices=("shm", "data"), default="shm",
                   help="filesystem broker's folder (ATTRIB_BROKER_DIR): a fresh one in /dev/shm (tmpfs; "
                        "falls back to data without it) or the server's default <data dir>/broker")
    g.add_argument("--api-processes", type=int, default=2,
                   help="HTTP server processes (attrib serve --api-processes): one per core here")
    g.add_argument("--worker", choices=("paused", "running"), default="paused",
                   help="paused: SIGSTOP the worker while measuring, so the queued jobs do not take "
                        "the 2 cores from the API; running: let it sample them meanwhile")
    g.add_argument("--keep", action="store_true", help="keep the temporary data dir / fresh database")
    g.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the server, e.g. ATTRIB_AUTH_CACHE_S=0 (repeatable); the per-key "
                        "rate limit is off unless set here (ATTRIB_RATE_LIMIT_PER_MINUTE)")
    g.add_argument("--works", type=int, default=10_000,
                   help="works added to the rights holder of the page phases (gallery, work_page)")
    p.add_argument("--setup-steps", type=int, default=4,
                   help="sampling steps of the setup's generation (its attribution's cost grows with them)")
    p.add_argument("--enqueue-steps", type=int, default=1,
                   help="sampling steps of the enqueued generations (work left to the worker)")
    args = p.parse_args()
    if args.duration is None:
        args.duration = 8.0 if args.quick else 30.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    try:
        args.levels = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        p.error(f"--clients: integers separated by commas, not {args.clients!r}")
    if not args.levels or min(args.levels) < 1:
        p.error("--clients: at least one level, each >= 1")
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not args.phase_list or set(args.phase_list) - set(PHASES):
        p.error(f"--phases: a subset of {','.join(PHASES)}")
    if args.url:
        if not args.operator_key:
            p.error("--url needs --operator-key")
        if args.database_url or args.broker_url or args.data_dir or args.server_env:
            p.error("--database-url/--broker-url/--data-dir/--server-env are for the embedded server "
                    "(no --url)")
    elif any("=" not in kv for kv in args.server_env):
        p.error("--server-env: NAME=VALUE")
    elif args.operator_key or args.owner_key:
        p.error("--operator-key/--owner-key are for --url (the embedded server makes its own keys)")
    return args


# ------------------------------------------------------------------------------ CPU accounting
def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as fh:
            f = [float(x) for x in fh.readline().split()[1:]]
        return (sum(f[:3]) + sum(f[5:8])) / TICK  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


def _proc_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / TICK  # utime stime
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[1]) == pid:
            out.append(int(d.name))
    return out


def _snapshot(server_pids: list[int]) -> dict[str, float | None]:
    cpu = [c for c in map(_proc_cpu_s, server_pids) if c is not None]
    return {"wall": time.perf_counter(), "client": time.process_time(), "busy": _machine_busy_s(),
            "server": sum(cpu) if server_pids and len(cpu) == len(server_pids) else None}


def _cpu_usage(a: dict[str, float | None], b: dict[str, float | None], requests: int) -> dict[str, Any]:
    """Over a..b: shares of the machine's CPU capacity (all cores) used by the client, the server
    and other processes, and client/server CPU milliseconds per answered request."""
    wall = (b["wall"] or 0.0) - (a["wall"] or 0.0)
    cap = wall * (os.cpu_count() or 1)
    if cap <= 0:
        return {}

    def d(k: str) -> float | None:
        x, y = a[k], b[k]
        return None if x is None or y is None else max(0.0, y - x)

    client, server, busy = d("client"), d("server"), d("busy")
    other = None if busy is None else max(0.0, busy - (client or 0.0) - (server or 0.0))

    def share(v: float | None) -> float | None:
        return None if v is None else round(v / cap, 3)

    def per_req(v: float | None) -> float | None:
        return None if v is None or not requests else round(v / requests * 1000, 2)

    return {"client_cpu_share": share(client), "server_cpu_share": share(server),
            "other_cpu_share": share(other), "client_cpu_ms_per_req": per_req(client),
            "server_cpu_ms_per_req": per_req(server)}


# ----------------------------------------------------------------------------------- load
def _pct(sorted_s: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    i = max(0, min(len(sorted_s) - 1, math.ceil(q * len(sorted_s)) - 1))
    return round(sorted_s[i] * 1000, 2)


class RawResponse:
    """What the phases read of an answer: status and body."""

    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code, self.content = status_code, content

    def json(self) -> Any:
        return json.loads(self.content)


class RawError(Exception):
    """A transport failure of RawClient (connection lost, malformed answer, timeout)."""


class RawClient:
    """One HTTP/1.1 keep-alive connection over asyncio streams, sending pre-built requests: the
    load generator's side costs ~0.1 ms of CPU per request (httpx: ~0.8-1 ms), so on a machine
    that client and server share, the bench measures the server (the role wrk plays in C).
    Answers with Content-Length or chunked bodies; reconnects after ``Connection: close``."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        u = httpx.URL(url)
        if u.scheme != "http":
            raise SystemExit(f"--client raw speaks plain http://, not {u.scheme}:// (use --client httpx)")
        self.host, self.port, self.timeout = u.host, u.port or 80, timeout
        self.base = u.raw_path.rstrip(b"/").decode()
        all_headers = {"Host": f"{self.host}:{self.port}", **headers}
        self.head = "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._built: dict[tuple[str, str, bytes, tuple[tuple[str, str], ...]], bytes] = {}

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    def _build(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        key = (method, path, body, tuple((headers or {}).items()))
        req = self._built.get(key)
        if req is None:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            length = f"Content-Length: {len(body)}\r\n" if body or method != "GET" else ""
            req = f"{method} {self.base}{path} HTTP/1.1\r\n{self.head}{extra}{length}\r\n".encode() + body
            if len(self._built) < 64:  # GETs repeat; each POST body is new
                self._built[key] = req
        return req

    async def get(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return await self.request("GET", path, b"", headers)

    async def post(self, path: str, content: bytes = b"",
                   headers: dict[str, str] | None = None) -> RawResponse:
        return await self.request("POST", path, content, headers)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> RawResponse:
        req = self._build(method, path, body, headers)
        try:
            async with asyncio.timeout(self.timeout):
                if self._conn is None:
                    self._conn = await asyncio.open_connection(self.host, self.port)
                reader, writer = self._conn
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                lower = head.lower()
                close = b"\r\nconnection: close" in lower
                i = lower.find(b"\r\ncontent-length:")
                if i >= 0:
                    content = await reader.readexactly(int(lower[i + 17 : lower.index(b"\r\n", i + 2)]))
                elif b"\r\ntransfer-encoding: chunked" in lower:
                    parts = []
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        parts.append((await reader.readexactly(size + 2))[:-2])
                    await reader.readuntil(b"\r\n")  # the empty trailer
                    content = b"".join(parts)
                else:
                    content, close = await reader.read(), True
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError) as exc:
            self._close()
            raise RawError(f"{type(exc).__name__}: {exc}") from exc
        if close:
            self._close()
        return RawResponse(status, content)


Client = RawClient | httpx.AsyncClient
Request = Callable[[Any], Awaitable[Any]]


def make_clients(kind: str, url: str, key: str, clients: int, timeout: float) -> list[Client]:
    headers = {"Authorization": f"Bearer {key}"}
    if kind == "raw":
        return [RawClient(url, headers, timeout) for _ in range(clients)]
    # Clients are made before the clock starts: each AsyncClient would otherwise build its own
    # TLS context (tens of ms of CPU, even for http://), which at 128 clients eats the warm-up.
    tls = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return [httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout, http1=True,
                              http2=False, verify=tls) for _ in range(clients)]


async def run_phase(url: str, key: str, request: Request, clients: int, duration: float, warmup: float,
                    timeout: float, server_pids: list[int], rate: float = 0.0,
                    client_kind: str = "raw") -> dict[str, Any]:
    """rate > 0: each client sends on a fixed schedule of ``rate`` requests/s (random phase) and
    latency counts from the scheduled time (no coordinated omission); 0: closed loop."""
    lat: list[float] = []
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    every: Counter[str] = Counter()  # all requests of the phase, warm-up and drain included
    snaps: dict[str, dict[str, float | None]] = {}
    pool = make_clients(client_kind, url, key, clients, timeout)
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + duration

    async def client(c: Client) -> None:
        due = start + (secrets.randbelow(1_000_000) / 1_000_000) / rate if rate > 0 else 0.0
        async with c:
            while (t0 := time.perf_counter()) < t_end:
                if rate > 0:
                    if due > t0:
                        await asyncio.sleep(due - t0)
                    t0, due = due, due + 1.0 / rate
                    if t0 >= t_end:
                        break
                try:
                    r = await request(c)
                    status: int | None = r.status_code
                    every[str(r.status_code)] += 1
                except (httpx.HTTPError, RawError) as exc:
                    status = None
                    every[type(exc).__name__] += 1
                    if t0 >= t_measure:
                        failures[type(exc).__name__] += 1
                t1 = time.perf_counter()
                if t0 >= t_measure and status is not None:
                    lat.append(t1 - t0)
                    statuses[status] += 1

    async def clock() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        snaps["a"] = _snapshot(server_pids)
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        snaps["b"] = _snapshot(server_pids)

    await asyncio.gather(clock(), *(client(c) for c in pool))
    lat.sort()
    n = len(lat)
    non2xx = sum(v for s, v in statuses.items() if not 200 <= s < 300)
    out: dict[str, Any] = {"requests": n + sum(failures.values()), "answered": n,
                           "throughput_rps": round(n / duration, 1),
                           "load": f"paced {rate:g} req/s per client" if rate > 0 else "closed loop"}
    if n:
        out.update(p50_ms=_pct(lat, 0.50), p90_ms=_pct(lat, 0.90), p99_ms=_pct(lat, 0.99),
                   max_ms=round(lat[-1] * 1000, 2), mean_ms=round(sum(lat) / n * 1000, 2))
    out["errors"] = {"non_2xx": non2xx, "5xx": sum(v for s, v in statuses.items() if s >= 500),
                     "429": statuses.get(429, 0),
                     "transport": sum(failures.values()),
                     "by_status": {str(s): v for s, v in sorted(statuses.items()) if not 200 <= s < 300},
                     "by_exception": dict(failures)}
    out["all_requests"] = dict(sorted(every.items()))  # by status or exception, outside the window too
    out.update(_cpu_usage(snaps["a"], snaps["b"], n))
    return out


def load_requests(setup: dict[str, Any], seeds: itertools.count[int], steps: int,
                  job_ids: list[str]) -> dict[str, tuple[str, Request]]:
    """Phase -> (key to use, request). Enqueued job ids are appended to ``job_ids``."""
    aid = setup["attribution_id"]
    json_type = {"Content-Type": "application/json"}

    async def enqueue(c: Client) -> Any:
        r = await c.post("/generate", content=b'{"seeds": [%d], "steps": %d}' % (next(seeds), steps),
                         headers=json_type)
        if r.status_code == 202:
            job_ids.append(r.json()["job_id"])
        return r

    def ranking(c: Client) -> Awaitable[Any]:
        return c.get(f"/attributions/{aid}")

    out: dict[str, tuple[str, Request]] = {"enqueue": (setup["operator_key"], enqueue),
                                           "ranking": (setup["operator_key"], ranking)}
    if setup.get("work_id") is not None:
        wid = setup["work_id"]

        def influence(c: Client) -> Awaitable[Any]:
            return c.get(f"/works/{wid}/influence")

        out["influence"] = (setup["owner_key"], influence)
    if setup.get("session_cookie") is not None:
        cookie = {"Cookie": f"attrib_session={setup['session_cookie']}"}

        def gallery(c: Client) -> Awaitable[Any]:
            return c.get("/web/works", headers=cookie)

        def work_page(c: Client) -> Awaitable[Any]:
            return c.get(f"/web/works/{wid}", headers=cookie)

        out["gallery"] = (setup["owner_key"], gallery)
        out["work_page"] = (setup["owner_key"], work_page)
    return out


def add_works(database_url: str, owner: str, count: int) -> int:
    """``count`` more works (one dataset, all with the image of an existing work) for ``owner``;
    returns how many works the owner has now."""
    from sqlalchemy import func, insert, select

    from app.db import Database
    from app.orm import Dataset, Owner, TrainingItem

    db = Database(database_url)
    try:
        with db.session() as s:
            owner_id = s.scalar(select(Owner.id).where(Owner.name == owner))
            image_sha, sha = s.execute(select(TrainingItem.image_sha, TrainingItem.sha256).limit(1)).one()
            ds = Dataset(name=f"bench-works-{secrets.token_hex(4)}", channels=1, height=8, width=8,
                         item_count=count, spec={}, fingerprint=sha)
            s.add(ds)
            s.flush()
            rows = [dict(dataset_id=ds.id, index=i, owner_id=owner_id, external_ref=f"bench work {i}",
                         label=None, sha256=sha, image_sha=image_sha) for i in range(count)]
            for lo in range(0, count, 1000):
                s.execute(insert(TrainingItem), rows[lo : lo + 1000])
        with db.session() as s:
            return int(s.scalar(select(func.count()).where(TrainingItem.owner_id == owner_id)) or 0)
    finally:
        db.dispose()


def sign_in(url: str, key: str) -> str:
    """A web session of ``key`` through the sign-in form: the session cookie's value."""
    with httpx.Client(base_url=url, timeout=30) as c:
        form = c.get("/web/sign-in")
        token = form.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        r = c.post("/web/sign-in", data={"key": key, "csrf_token": token})
        cookie = c.cookies.get("attrib_session")
        if cookie is None:
            raise RuntimeError(f"sign-in to the web pages failed: HTTP {r.status_code} {r.text[:300]}")
        page = c.get("/web/works")
        if page.status_code != 200:
            raise RuntimeError(f"GET /web/works: HTTP {page.status_code}")
        return cookie


# ---------------------------------------------------------------------------------- setup
def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def memory_phase(url: str, operator_key: str, server: Any, jobs: int, seed0: int) -> dict[str, Any]:
    """Run ``jobs`` real jobs through the worker and sample the resident memory of the API and of
    the worker's processes (master and pool children) along the way."""
    def worker_pids() -> list[int]:
        return [p for g in server.worker_pgids for p in _group_pids(g)]

    samples: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {operator_key}"}, timeout=30) as c:
        ids = []
        for i in range(jobs):
            r = c.post("/generate", json={"seeds": [seed0 + i], "steps": 2})
            ids.append(_expect(r, 202, "POST /generate (memory phase)")["job_id"])
        done_marks = {round(jobs * q) for q in (0.0, 0.25, 0.5, 0.75, 1.0)}
        t0 = time.monotonic()
        remaining = list(ids)
        while True:
            # Jobs finish roughly in order: drop the finished ones from the front (few requests,
            # so that polling does not slow the worker down).
            while remaining and c.get(f"/jobs/{remaining[0]}").json()["status"] not in ("queued", "running"):
                remaining.pop(0)
            finished = jobs - len(remaining)
            mark = max((m for m in done_marks if m <= finished), default=0)
            if mark in done_marks:
                done_marks.discard(mark)
                samples.append({"jobs_done": finished, "api_rss_mb": _rss_mb(server.api_pids()),
                                "worker_rss_mb": _rss_mb(worker_pids()),
                                "t_s": round(time.monotonic() - t0, 1)})
            if not remaining:
                break
            if time.monotonic() - t0 > 900:
                raise RuntimeError(f"memory phase: {len(remaining)} of {jobs} jobs unfinished after 900 s")
            time.sleep(0.5)
        failed = sum(1 for j in ids if c.get(f"/jobs/{j}").json()["status"] != "succeeded")
    ref = samples[1] if len(samples) > 2 else samples[0]  # after warm-up (imports, caches)
    last = samples[-1]

    def growth(k: str) -> float:
        return round(100.0 * (last[k] - ref[k]) / ref[k], 1) if ref[k] else 0.0

    return {"jobs": jobs, "failed": failed, "samples": samples,
            "api_growth_pct": growth("api_rss_mb"), "worker_growth_pct": growth("worker_rss_mb"),
            "note": "growth from the second sample (after warm-up) to the end"}


def _group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _wait_job(c: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        r = c.get(f"/jobs/{job_id}")
        r.raise_for_status()
        job: dict[str, Any] = r.json()
        if job["status"] in ("succeeded", "failed"):
            if job["status"] == "failed":
                raise RuntimeError(f"setup job {job_id} ({job['kind']}) failed: {job['error']}")
            return job
        if time.monotonic() > end:
            raise RuntimeError(f"setup job {job_id} still {job['status']} after {timeout:.0f} s "
                               "(is a worker running, or busy with a backlog?)")
        time.sleep(0.2)


def _expect(r: httpx.Response, status: int, what: str) -> dict[str, Any]:
    if r.status_code != status:
        raise RuntimeError(f"{what}: HTTP {r.status_code} {r.text[:300]}")
    body: dict[str, Any] = r.json()
    return body


def setup(url: str, operator_key: str, owner_keys: dict[str, str], owner_key: str | None, seed: int,
          steps: int, timeout: float) -> dict[str, Any]:
    """One generation, its top-100 attribution, and a work of the owner ranked in it."""
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {operator_key}"}, timeout=30) as c:
        acc = _expect(c.post("/generate", json={"seeds": [seed], "steps": steps}), 202, "POST /generate")
        _wait_job(c, acc["job_id"], timeout)
        gid = acc["generation_ids"][0]
        C.log(f"setup: generation {gid} sampled ({time.perf_counter() - t0:.1f} s); "
              f"attributing, top_k={TOP_K}")
        acc = _expect(c.post("/attribute", json={"generation_id": gid, "top_k": TOP_K}), 202,
                      "POST /attribute")
        _wait_job(c, acc["job_id"], timeout)
        aid = acc["attribution_id"]
        att = _expect(c.get(f"/attributions/{aid}"), 200, "GET /attributions")
        entries = att["entries"]
        if len(entries) != TOP_K:
            raise RuntimeError(f"attribution {aid} has {len(entries)} entries, expected {TOP_K}")
        work_id, key, owner = None, None, None
        for e in entries:  # demo keys: owner name -> key
            if e.get("owner_name") in owner_keys:
                work_id, owner, key = e["training_item_id"], e["owner_name"], owner_keys[e["owner_name"]]
                break
        if work_id is None and owner_key:  # an explicit key: the first ranked work it can see
            for e in entries:
                r = c.get(f"/works/{e['training_item_id']}", headers={"Authorization": f"Bearer {owner_key}"})
                if r.status_code == 200:
                    work_id, owner, key = e["training_item_id"], e.get("owner_name"), owner_key
                    break
        if work_id is not None:
            assert key is not None
            r = c.get(f"/works/{work_id}/influence", headers={"Authorization": f"Bearer {key}"})
            inf = _expect(r, 200, "GET /works/{id}/influence")
            if not any(i["attribution_id"] == aid for i in inf["items"]):
                raise RuntimeError(f"work {work_id}'s influence does not list attribution {aid}")
    rank = next(e["rank"] for e in entries if e["training_item_id"] == work_id) if work_id else None
    return {"generation_id": gid, "attribution_id": aid, "entries": len(entries),
            "ranking_bytes": len(json.dumps(att)), "work_id": work_id, "work_rank": rank,
            "work_owner": owner, "operator_key": operator_key, "owner_key": key,
            "seconds": round(time.perf_counter() - t0, 1)}


def _settle(url: str, limit: float) -> float | None:
    """Seconds until /healthz answers within 1 s (requests of an earlier phase may still hold
    the server's threads), or None after ``limit`` seconds."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return round(time.perf_counter() - t0, 1)
        time.sleep(0.5)
    return None


# ------------------------------------------------------------------------ embedded server
def _attrib() -> list[str]:
    script = Path(sys.executable).with_name("attrib")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _kind(url: str | None, default: str) -> str:
    if not url:
        return default
    return url.split(":", 1)[0].split("+", 1)[0]


class Embedded:
    """demo-setup in a data dir, then ``attrib serve`` in its own process group."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pgids: list[int] = []
        self.temp = args.data_dir is None
        self.broker_dir: Path | None = None
        if args.broker_dir == "shm" and not args.broker_url and Path("/dev/shm").is_dir():
            self.broker_dir = Path(tempfile.mkdtemp(prefix="attrib-bench-broker-", dir="/dev/shm"))
        self.dir = Path(args.data_dir or tempfile.mkdtemp(prefix="attrib-bench-api-")).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.database_url = args.database_url
        self.created_db: str | None = None
        self.log_path = self.dir / "bench-serve.log"
        self.url = ""
        self.keys: dict[str, str] = {}
        self.times: dict[str, float] = {}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "ATTRIB_DATABASE_URL", "BROKER_URL", "ATTRIB_BROKER_URL",
                            "ATTRIB_OPERATOR_KEY")}
        env["ATTRIB_DATA_DIR"] = str(self.dir)
        # One operator key sends every request: the per-key rate limit would answer 429.
        env["ATTRIB_RATE_LIMIT_PER_MINUTE"] = "0"
        env.update(kv.split("=", 1) for kv in self.args.server_env)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.args.broker_url:
            env["BROKER_URL"] = self.args.broker_url
        if self.broker_dir is not None:
            env["ATTRIB_BROKER_DIR"] = str(self.broker_dir)
        return env

    def _fresh_postgres(self) -> None:
        from sqlalchemy.engine import make_url

        u = make_url(self.database_url)
        if u.get_backend_name() != "postgresql":
            return
        import psycopg
        from psycopg import sql

        name = u.database or f"attrib_bench_{secrets.token_hex(4)}"
        admin = u.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                self.created_db = name
                C.log(f"created PostgreSQL database {name}")
        self.database_url = u.set(database=name).render_as_string(hide_password=False)

    def start(self) -> None:
        env = self._env()
        if self.database_url:
            self._fresh_postgres()
            env = self._env()
            t0 = time.perf_counter()
            subprocess.run([*_attrib(), "migrate"], env=env, cwd=C.ROOT, check=True, stdout=sys.stderr)
            self.times["migrate_s"] = round(time.perf_counter() - t0, 1)
        C.log(f"demo-setup --preset {self.args.preset} in {self.dir} (trains unless already there) ...")
        t0 = time.perf_counter()
        out = subprocess.run([*_attrib(), "demo-setup", "--preset", self.args.preset, "--json"], env=env,
                             cwd=C.ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
        self.times["demo_setup_s"] = round(time.perf_counter() - t0, 1)
        self.keys = json.loads(out.strip().splitlines()[-1])["keys"]
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*_attrib(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--api-processes", str(self.args.api_processes), "--loglevel", "warning"],
                env=env, cwd=C.ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        C.log(f"serving {self.url} (pid {self.proc.pid}, log {self.log_path}); waiting for /readyz")
        end = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"attrib serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > end:
                raise RuntimeError(f"{self.url}/readyz not ready after 180 s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.times["server_start_s"] = round(time.perf_counter() - t0, 1)
        C.log(f"ready after {self.times['server_start_s']} s")
        # The worker runs in a session of its own (attrib serve starts it so).
        self.worker_pgids = sorted({os.getpgid(p) for p in _children(self.proc.pid)} - {self.proc.pid})

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def api_pids(self) -> list[int]:
        """attrib serve and its HTTP server processes (not the worker, in sessions of its own)."""
        if self.proc is None:
            return []
        kids = []
        for p in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(p) not in self.worker_pgids:
                    kids.append(p)
        return [self.proc.pid, *kids]

    def signal_worker(self, sig: signal.Signals) -> None:
        for g in self.worker_pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)

    def stop(self, job_ids: list[str]) -> None:
        kept = not self.temp or self.args.keep or (self.database_url is not None and not self.created_db)
        if self.proc is not None and kept and job_ids:
            with contextlib.suppress(Exception):  # best effort: the worker would skip them
                self._fail_jobs(job_ids)
        if self.proc is not None:
            self.signal_worker(signal.SIGCONT)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)  # serve stops its worker itself
                self.signal_worker(signal.SIGTERM)
            # Celery's warm shutdown takes seconds; nothing of this run is worth waiting for.
            deadline = time.monotonic() + 3
            while any(_alive_group(g) for g in self.worker_pgids) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.signal_worker(signal.SIGKILL)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        if self.created_db and not self.args.keep:
            with contextlib.suppress(Exception):
                self._drop_db(self.created_db)
        if self.broker_dir is not None:  # wake-up messages only: the jobs are in the database
            shutil.rmtree(self.broker_dir, ignore_errors=True)
        if self.temp and not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.temp:
            C.log(f"kept {self.dir}")

    def _fail_jobs(self, job_ids: list[str]) -> None:
        """Mark this run's still-queued enqueue jobs failed (the paused worker has not run them),
        so that a kept data dir or database does not leave the worker a backlog."""
        from sqlalchemy import update

        from app.db import Database
        from app.orm import Job, utcnow

        db = Database(self.database_url or f"sqlite:///{self.dir / 'attrib.db'}")
        n = 0
        try:
            for i in range(0, len(job_ids), 500):
                with db.session() as s:
                    res = s.execute(update(Job).where(Job.id.in_(job_ids[i:i + 500]), Job.status == "queued")
                                    .values(status="failed", error="not run: load test (bench/api.py)",
                                            finished_at=utcnow()))
                    n += int(res.rowcount or 0)  # type: ignore[attr-defined]
        finally:
            db.dispose()
        C.log(f"marked {n} queued load-test jobs failed")

    def _drop_db(self, name: str) -> None:
        import psycopg
        from psycopg import sql
        from sqlalchemy.engine import make_url

        admin = make_url(self.database_url).set(drivername="postgresql", database="postgres")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        C.log(f"dropped PostgreSQL database {name}")


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# ----------------------------------------------------------------------------------- main
def _loop_runner() -> tuple[asyncio.Runner, str]:
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop), f"uvloop {uvloop.__version__}"
    except ImportError:
        return asyncio.Runner(), "asyncio"


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.perf_counter()
    loadavg_start = C._loadavg()
    server = None if args.url else Embedded(args)
    job_ids: list[str] = []
    memory: dict[str, Any] | None = None
    try:
        if server is not None:
            server.start()
            url, op_key = server.url, server.keys["operator"]
            owner_keys = {k: v for k, v in server.keys.items() if k != "operator"}
            owner_key = None
        else:
            url, op_key, owner_keys, owner_key = args.url.rstrip("/"), args.operator_key, {}, args.owner_key
        seed0 = args.seed if args.seed is not None else secrets.randbits(32) << 20
        st = setup(url, op_key, owner_keys, owner_key, seed0, args.setup_steps, args.setup_timeout)
        C.log(f"setup: attribution {st['attribution_id']} ({st['entries']} entries, "
              f"{st['ranking_bytes']} bytes), work {st['work_id']} of {st['work_owner']!r} "
              f"(rank {st['work_rank']}), {st['seconds']} s")
        if server is not None and st["work_owner"] is not None and st["owner_key"] is not None:
            t0 = time.perf_counter()
            st["owner_works"] = add_works(server.database_url or f"sqlite:///{server.dir / 'attrib.db'}",
                                          st["work_owner"], args.works)
            st["session_cookie"] = sign_in(url, st["owner_key"])
            C.log(f"setup: {st['work_owner']!r} has {st['owner_works']} works, signed in to the pages "
                  f"({time.perf_counter() - t0:.1f} s)")
        if server is not None and args.worker == "paused":
            server.signal_worker(signal.SIGSTOP)
        requests = load_requests(st, itertools.count(seed0 + 1), args.enqueue_steps, job_ids)
        runner, loop_name = _loop_runner()
        results: dict[int, dict[str, Any]] = {n: {} for n in args.levels}
        skipped: dict[str, str] = {}
        # Level by level (a stall at a high level must not spoil a lower one), reads first.
        plan = [(n, ph) for n in args.levels for ph in PHASES if ph in args.phase_list]
        with runner:
            for n, phase in plan:
                if phase not in requests:
                    skipped[phase] = ("no --owner-key, or no work of that rights holder in the top 100"
                                      + ("; the page phases need the embedded server" if args.url else ""))
                    continue
                key, req = requests[phase]
                settle = _settle(url, 120.0)
                if settle is None:
                    skipped[f"{phase}@{n}"] = "the server did not answer /healthz within 1 s for 120 s"
                    continue
                C.log(f"{phase}: {n} clients, {args.warmup:g} s warm-up + {args.duration:g} s ...")
                server_pids = server.api_pids() if server is not None else []
                r = runner.run(run_phase(url, key, req, n, args.duration, args.warmup, args.timeout,
                                         server_pids, args.rate, args.client))
                r["settle_s"] = settle
                results[n][phase] = r
                errs = r["errors"]["non_2xx"] + r["errors"]["transport"]
                C.log(f"  p50 {r.get('p50_ms')} ms, p99 {r.get('p99_ms')} ms, max {r.get('max_ms')} ms, "
                      f"{r['throughput_rps']} req/s, errors {errs}"
                      f"; cpu client {r.get('client_cpu_share')} server {r.get('server_cpu_share')} "
                      f"other {r.get('other_cpu_share')}")
        if server is not None and args.memory_jobs > 0:
            C.log(f"memory: {args.memory_jobs} jobs through the worker ...")
            server._fail_jobs(job_ids)  # the enqueue phase's backlog: skipped, not run
            server.signal_worker(signal.SIGCONT)
            memory = memory_phase(url, op_key, server, args.memory_jobs, seed0 + 10_000_000)
            C.log(f"  api rss {[m['api_rss_mb'] for m in memory['samples']]} MB, worker rss "
                  f"{[m['worker_rss_mb'] for m in memory['samples']]} MB")
    finally:
        if server is not None:
            t0 = time.perf_counter()
            server.stop(job_ids)
            server.times["teardown_s"] = round(time.perf_counter() - t0, 1)

    def meets(res: dict[str, Any]) -> dict[str, bool | None]:
        out: dict[str, bool | None] = {}
        for name, target in TARGETS_MS.items():
            r = res.get(name.removesuffix("_p99_ms"))
            out[name] = None if r is None or "p99_ms" not in r else bool(
                r["p99_ms"] < target and r["errors"]["non_2xx"] == 0 and r["errors"]["transport"] == 0)
        return out

    by_clients = [{"clients": n, **{ph: results[n][ph] for ph in PHASES if ph in results[n]},
                   "meets_targets": meets(results[n])} for n in args.levels]
    first = results[args.levels[0]]
    checks = meets(first)
    warnings = []
    for n in args.levels:
        for ph, r in results[n].items():
            if server is not None and (r.get("other_cpu_share") or 0) > 0.2:  # external: server is "other"
                warnings.append(f"{ph} at {n} clients: other processes used {r['other_cpu_share']:.0%} of "
                                "the machine's CPU while measuring; latencies are inflated, rerun when idle")
            if r["errors"]["non_2xx"] or r["errors"]["transport"]:
                warnings.append(f"{ph} at {n} clients: {r['errors']}")
            if not r["answered"]:
                warnings.append(f"{ph} at {n} clients: none answered while measuring (server stalled?); "
                                f"all requests of the phase: {r['all_requests']}")
    out = {
        "bench": "api",
        "quick": args.quick,
        **{f"{ph}_p99_ms": first.get(ph, {}).get("p99_ms") for ph in PHASES},
        **{f"{ph}_p50_ms": first.get(ph, {}).get("p50_ms") for ph in PHASES},
        **{f"{ph}_rps": first.get(ph, {}).get("throughput_rps") for ph in PHASES},
        "targets": {k: f"< {v:g} ms at {args.levels[0]} clients, no errors" for k, v in TARGETS_MS.items()},
        "meets_targets": all(v is True for v in checks.values()) if checks else False,
        "checks": checks,
        "by_clients": by_clients,
        "skipped": skipped,
        "setup": {k: v for k, v in st.items() if not k.endswith(("_key", "_cookie"))},
        "enqueued_jobs": len(job_ids),
        "memory": memory,
        "config": {
            "load": f"paced {args.rate:g} req/s per client" if args.rate > 0 else "closed loop",
            "clients": args.levels, "duration_s": args.duration, "warmup_s": args.warmup,
            "url": url, "embedded": server is not None,
            "database": _kind(server.database_url if server else args.database_url,
                              "sqlite" if server else "unknown"),
            "broker": _kind(args.broker_url, "filesystem" if server else "unknown"),
            "broker_dir": (str(server.broker_dir) if server and server.broker_dir
                           else "<data dir>/broker" if server and not args.broker_url else None),
            "server": (f"attrib serve --workers 1 --api-processes {args.api_processes} (uvicorn), "
                       f"preset {args.preset}" if server else "external"),
            "worker_while_measuring": args.worker if server else "unknown (external server)",
            "setup_steps": args.setup_steps,
            "enqueue_steps": args.enqueue_steps,
            "server_env": (["ATTRIB_RATE_LIMIT_PER_MINUTE=0", *args.server_env] if server else []),
            "client": (("RawClient (asyncio streams)" if args.client == "raw"
                        else f"httpx {httpx.__version__} AsyncClient")
                       + f", 1 HTTP/1.1 keep-alive connection per client, one {loop_name} event loop"),
            "times_s": server.times if server else {},
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg_start,
        },
        "note": "latencies are measured by the client and include its own event loop: load generator "
                "and server share this machine's CPU cores (see client/server/other_cpu_share per phase; "
                "other_cpu_share includes PostgreSQL and Redis when they run here, and an external "
                "--url server)",
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "seconds_excluding_demo_setup": round(time.perf_counter() - t_start
                                              - (server.times.get("demo_setup_s", 0) if server else 0), 1),
        "loadavg_end": C._loadavg(),
        "warnings": warnings,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
