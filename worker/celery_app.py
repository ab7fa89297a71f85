"""The worker's Celery application: ``celery -A worker.celery_app worker`` (or ``attrib worker``)."""

from __future__ import annotations

from app.queue import make_celery
from app.settings import get_settings

celery = make_celery(get_settings())
celery.conf.imports = ("worker.tasks",)
app = celery
