"""Real processes for end-to-end and fault tests: the attrib CLI, `attrib serve`, Celery workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def attrib(env: dict[str, str], *args: str) -> dict:
    """Run `attrib ... --json`; returns its JSON output (fails the test on a non-zero exit)."""
    r = subprocess.run([str(BIN / "attrib"), *args, "--json"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"attrib {' '.join(args)}: {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start in its own process group (so stop() takes its children too), cwd = the log's folder."""
    fh = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=log.parent)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def serve(env: dict[str, str], tmp: Path, workers: int = 1,
          args: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = start([str(BIN / "attrib"), "serve", "--port", str(port), "--workers", str(workers), *args],
                 env, tmp / "serve.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _get(url + "/healthz") == 200, 60, lambda: (tmp / "serve.log").read_text()[-3000:])
    return proc, url


def worker(env: dict[str, str], tmp: Path, name: str = "worker") -> subprocess.Popen[bytes]:
    return start([str(BIN / "attrib"), "worker"], env, tmp / f"{name}.log")


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def wait_until(cond: object, timeout: float, why: object = None, every: float = 0.2) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s" + (f": {why()}" if callable(why) else ""))


def wait_job(c: httpx.Client, job_id: str, headers: dict[str, str], timeout: float = 180) -> dict:
    job: dict = {}

    def done() -> bool:
        nonlocal job
        job = c.get(f"/jobs/{job_id}", headers=headers).json()
        return job["status"] in ("succeeded", "failed")

    wait_until(done, timeout, lambda: job, every=0.3)
    return job
