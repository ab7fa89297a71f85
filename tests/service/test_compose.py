"""docker-compose.yml is valid (Debian's docker-compose; there is no Docker engine here) and
wires what the service needs: healthchecks, healthy dependencies, one-shot migrate, a GPU
reservation for the optional GPU worker."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.service.services import require_tool

ROOT = Path(__file__).resolve().parents[2]


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = require_tool("docker-compose", "apt-get install docker-compose")
    return subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), *args], capture_output=True,
                          text=True, env=env if env is not None else dict(os.environ), timeout=60, cwd=ROOT)


def test_compose_file_is_valid_and_complete() -> None:
    r = compose("--profile", "gpu", "config", env={**os.environ, "ATTRIB_OPERATOR_KEY": "k"})
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    svc = cfg["services"]
    assert set(svc) == {"postgres", "redis", "migrate", "api", "worker", "worker-long", "worker-gpu"}
    for name in ("postgres", "redis", "api", "worker", "worker-long", "worker-gpu"):
        assert "healthcheck" in svc[name], name
    for name in ("api", "worker", "worker-long", "worker-gpu"):
        dep = svc[name]["depends_on"]
        assert dep["postgres"]["condition"] == "service_healthy"
        assert dep["redis"]["condition"] == "service_healthy"
        assert dep["migrate"]["condition"] == "service_completed_successfully"
        env = svc[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and env["BROKER_URL"].startswith("redis://")
    assert svc["migrate"]["command"] == ["attrib", "migrate", "upgrade"]
    # A worker service per job queue, pinged by its node name (app.workers.worker_command), and
    # given longer to stop than a job's grace period (stop_grace_s, 10 s by default).
    for name, queue in (("worker", "interactive"), ("worker-long", "long"), ("worker-gpu", "interactive")):
        cmd = svc[name]["command"]
        assert cmd[:2] == ["attrib", "worker"] and cmd[cmd.index("--queues") + 1] == queue, name
        # `config` prints the file's own escape ($$: a literal $ for the container's shell)
        assert f"-d {queue}@$HOSTNAME" in svc[name]["healthcheck"]["test"][1].replace("$$", "$"), name
        assert svc[name]["stop_grace_period"] in ("30s", 30, "30"), name
    devices = svc["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert svc["worker-gpu"]["profiles"] == ["gpu"]  # opt-in
    assert svc["worker-gpu"]["environment"]["ATTRIB_DEVICE"] == "cuda"


def test_compose_refuses_to_start_without_an_operator_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ATTRIB_OPERATOR_KEY"}
    r = compose("config", "-q", env=env)
    assert r.returncode != 0 and "ATTRIB_OPERATOR_KEY" in r.stderr
