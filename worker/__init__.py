"""Celery worker: tasks are thin glue over models/ (see worker/engine.py).

Workers share their machine with the API (and, embedded, with everything else): OpenMP's
default spin-waiting then stalls every parallel region whenever another process holds a
core (measured 10-100x slower). Passive waiting avoids that cliff; set before torch loads,
an explicit OMP_WAIT_POLICY wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
