#!/usr/bin/env bash
# The paper-scale copies run on one CUDA GPU (an H100; < 10 minutes): a 300-image MNIST encoded
# ensemble (n = 16) of the widest paper-layout members that can train enough steps in the budget
# (measured in its first seconds), then the copies validation with exact counterfactuals and the
# authors' FAR. A thin wrapper around bench/gpu_copies.py; extra arguments are passed through
# (--cpu-smoke runs the same code path on the CPU with toy sizes; the suite runs it).
#
# Run from the repository root:   bench/gpu_copies.sh        (or DATA=... bench/gpu_copies.sh)
# Environment:
#   DATA    dataset (.npz)   default ../shared/data/mnist10k.npz (relative to the cwd)
#   PYTHON  interpreter      default .venv/bin/python if present, else python3
#   LIMIT_S hard wall limit  default 570 seconds
# Output: progress on stderr, one JSON object as the last line of stdout; the report in --out
# (default runs/gpu-copies/report.json).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${DATA:-../shared/data/mnist10k.npz}"
LIMIT_S="${LIMIT_S:-570}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  elif [[ -x "$here/../.venv/bin/python" ]]; then PYTHON="$here/../.venv/bin/python"
  else PYTHON=python3
  fi
fi
smoke=0
for a in "$@"; do [[ "$a" == "--cpu-smoke" ]] && smoke=1; done
if [[ $smoke == 0 && ! -e "$DATA" ]]; then
  echo "gpu_copies.sh: dataset not found: $DATA (set DATA=path/to/mnist10k.npz)" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader >&2 || true
fi
exec timeout --signal=INT --kill-after=10 "$LIMIT_S" "$PYTHON" "$here/gpu_copies.py" --data "$DATA" "$@"
