"""bench/gpu_copies.sh --cpu-smoke: the paper-scale copies run's code path on the CPU with toy sizes
(width probe, training into OUT, the copies validation with exact counterfactuals and FAR)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_copies_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu-copies"
    r = subprocess.run([str(ROOT / "bench" / "gpu_copies.sh"), "--cpu-smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["bench"] == "gpu_copies" and line["device"] == "cpu"
    assert [p["width"] for p in line["probes"]] == [8]  # the widest reaches the smoke's 4 steps
    assert line["width"] == 8 and line["train_steps"] >= 4
    assert set(line["targets"]) >= {"selective_attributable_copies", "shuffled_attributable",
                                    "cause_on_top_copies", "far_attributable"}
    assert set(line["far"]) == {"service", "service_attributable", "nearest_image", "influence"}
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 3 and report["ensemble"]["items"] == 40
    assert report["ensemble"]["checkpoint"] == str(out / "ensemble.pt")
    assert (out / "copies.png").is_file()
