"""The Celery application shared by the API (which only publishes job ids) and the worker.

Embedded default: kombu's filesystem transport (no server) in ``<data_dir>/broker`` or
``ATTRIB_BROKER_DIR``, with messages that appear whole. At scale: ``BROKER_URL=redis://...``.
Results never go through Celery: the job row is the result.

Jobs travel on one of two queues, by class: ``interactive`` (generate, attribute, small
batches: seconds) and ``long`` (validations, large batches: minutes or hours), so a worker of
each class serves its own and a long job never waits in front of an interactive one.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import filesystem, redis
from kombu.utils.json import dumps

from app.settings import Settings

TASK_NAME = "attrib.run_job"
INTERACTIVE = "interactive"
LONG = "long"
QUEUES = (INTERACTIVE, LONG)
LONG_KINDS = frozenset({"validate", "retrain"})
LONG_BATCH_SEEDS = 256
"""A batch of more seeds than this runs on the long queue: its jobs would otherwise hold the
interactive queue for longer than a person waits for one answer."""
FIRST_HEADER = "attrib-first"
"""Header of a message that goes to the front of its queue (a job handed back by a stopping
worker runs next, not behind everything queued meanwhile)."""


def queue_for(kind: str, batch_seeds: int | None = None) -> str:
    """The queue of a job of ``kind``, in a batch of ``batch_seeds`` seeds (None: no batch)."""
    if kind in LONG_KINDS or (batch_seeds is not None and batch_seeds > LONG_BATCH_SEEDS):
        return LONG
    return INTERACTIVE


def parse_queues(text: str) -> list[str]:
    """``interactive,long`` -> the queue names, each checked (ValueError names a bad one)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no queue named in {text!r}: give {', '.join(QUEUES)} (comma-separated)")
    for n in names:
        if n not in QUEUES:
            raise ValueError(f"unknown queue {n!r}: the queues are {', '.join(QUEUES)}")
    return list(dict.fromkeys(names))


class _AtomicChannel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]  # as filesystem.Channel
        """Write the message under a hidden name, then rename it into place.

        kombu's own _put creates ``<time>_<uuid>.<queue>.msg`` and only then locks and fills it:
        a consumer listing the folder in between reads it empty and the worker dies
        ("Unrecoverable error: JSONDecodeError", seen with two API processes publishing). A
        rename is atomic, and consumers skip names that do not end in ``.<queue>.msg``.
        """
        # The consumer takes the first name in sorted order: "0_" sorts before any timestamp.
        first = "0_" if payload.get("headers", {}).get(FIRST_HEADER) else ""
        name = f"{first}{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        hidden = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(hidden, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(hidden, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            raise ChannelError(f"cannot add file {final!r} to the broker folder") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport whose messages appear whole (see _AtomicChannel._put)."""

    Channel = _AtomicChannel


class _FrontRedisChannel(redis.Channel):
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]  # as redis.Channel
        """As redis.Channel._put, but a message marked FIRST_HEADER goes where consumers take
        the next one (they pop from the right; kombu pushes on the left)."""
        if not message.get("headers", {}).get(FIRST_HEADER):
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            client.rpush(key, dumps(message))


class FrontRedisTransport(redis.Transport):
    """kombu's Redis transport that can put a message at the front of its queue."""

    Channel = _FrontRedisChannel


def make_celery(settings: Settings) -> Celery:
    transport: dict[str, Any] = {}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(exist_ok=True)
        # The filesystem transport deletes a message when it is read (no redelivery): a job
        # whose worker died is re-sent by the API's reaper instead.
        transport = {"data_folder_in": str(folder), "data_folder_out": str(folder),
                     "control_folder": str(folder / "control"),
                     # kombu polls the folder (default every 1 s: up to a second per job).
                     "polling_interval": 0.1}
    elif settings.broker_url.startswith(("redis", "rediss")):
        transport = {
            # An unacknowledged message comes back only after this; the API's reaper re-sends
            # lost jobs long before, so keep it above the longest task.
            "visibility_timeout": settings.job_soft_time_limit_s + 600,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        }
    app = Celery("attrib", broker=settings.broker_url, set_as_current=False)
    if settings.broker_url.startswith("filesystem"):
        app.conf.broker_transport = f"{__name__}:AtomicFilesystemTransport"
    elif settings.broker_url.startswith(("redis", "rediss")):
        app.conf.broker_transport = f"{__name__}:FrontRedisTransport"
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_default_queue=INTERACTIVE,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_soft_time_limit_s + 60,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=200,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def publish(celery: Celery, job_id: str, queue: str, producer: Any = None, *, first: bool = False) -> None:
    """Send one job id to ``queue`` (raises on broker failure; the reaper retries later); with
    ``first``, to the front of the queue.

    The message is Celery's own task message (protocol 2, ``amqp.as_task_v2``), published
    straight to the queue: what ``send_task`` sends, without its per-call routing, signals and
    argument repr (measured: 182 -> 87 us per message on the filesystem broker in /dev/shm,
    386 -> 281 us on Redis; under load, server CPU per POST /generate fell 1.29-1.37 -> 1.05-1.12
    ms on PostgreSQL + Redis and 0.73-0.81 -> 0.66-0.72 ms embedded, bench/api.py --quick).
    """
    job_id = str(job_id)  # a JobRef is a str subclass the JSON encoder need not know
    msg = celery.amqp.as_task_v2(str(uuid.uuid4()), TASK_NAME, args=[job_id], kwargs={},
                                 argsrepr=repr([job_id]), kwargsrepr="{}")
    headers = {**msg.headers, FIRST_HEADER: True} if first else msg.headers
    with celery.producer_or_acquire(producer) as p:
        # The default exchange ("") delivers to the queue named by the routing key.
        p.publish(msg.body, exchange="", routing_key=queue, serializer="json", headers=headers,
                  delivery_mode=2, declare=[], retry=True, retry_policy=RETRY_POLICY, **msg.properties)


def broker_depth(celery: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` (not those a worker has taken)."""
    with celery.connection_for_read() as conn:
        return int(conn.default_channel._size(queue))
