"""Celery worker processes: the command line of one, and the pair `attrib serve` runs.

A worker consumes the queues it is given (app.queue: interactive, long). `attrib serve` starts
one worker per queue, so a long job (a validation, a large batch) never holds up an
interactive one: the interactive worker runs at normal priority with the configured torch
threads, the long one with ``long_worker_threads`` at a lower CPU priority, so on a small
machine interactive jobs keep most of the CPU while a long job runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from app.queue import INTERACTIVE, LONG, QUEUES
from app.settings import Settings

LONG_WORKER_NICE = 10
"""Added niceness of the long-queue worker of `attrib serve`: the kernel then gives the
interactive worker the CPU whenever both want it."""


@dataclass(frozen=True)
class WorkerSpec:
    queues: tuple[str, ...]
    concurrency: int
    threads: int | None  # torch threads per process (None: ATTRIB_WORKER_THREADS as set)
    nice: int = 0


def worker_command(queues: Sequence[str], concurrency: int, loglevel: str = "INFO") -> list[str]:
    """The `celery worker` command line consuming ``queues`` with ``concurrency`` processes."""
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise ValueError(f"queues must be among {', '.join(QUEUES)}, not {list(queues)}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "--queues", ",".join(queues),
            # One node name per set of queues: several workers on one host stay distinguishable.
            "--hostname", f"{'-'.join(queues)}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def worker_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["ATTRIB_WORKER_THREADS"] = str(threads)
    return env


def exec_worker(spec: WorkerSpec, loglevel: str) -> NoReturn:
    """Become the worker (`attrib worker`): signals reach Celery directly."""
    if spec.nice:
        os.nice(spec.nice)
    argv = worker_command(spec.queues, spec.concurrency, loglevel)
    os.execve(sys.executable, argv, worker_env(spec.threads))


def serve_workers(settings: Settings, interactive_processes: int) -> list[WorkerSpec]:
    """What `attrib serve --workers N` runs: N interactive processes and one long one (none at 0)."""
    if interactive_processes < 1:
        return []
    return [WorkerSpec((INTERACTIVE,), interactive_processes, None),
            WorkerSpec((LONG,), 1, settings.long_worker_threads, LONG_WORKER_NICE)]


def start_worker(spec: WorkerSpec, loglevel: str) -> subprocess.Popen[bytes]:
    """A worker in its own session (stop_workers signals its whole process group)."""
    nice = spec.nice
    argv = worker_command(spec.queues, spec.concurrency, loglevel)
    return subprocess.Popen(argv, env=worker_env(spec.threads), start_new_session=True,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], settings: Settings) -> None:
    """SIGTERM each worker's process group: each hands back or finishes its job (stop_grace_s);
    whatever is still alive well after that is killed."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=settings.stop_grace_s + 15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
