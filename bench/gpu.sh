#!/usr/bin/env bash
# GPU benchmark (one CUDA GPU, e.g. an H200; < 8 minutes): trains the "paper" preset on
# MNIST for STEPS steps, then times one 1000-step sampling run of 16 samples and its
# Jacobian. A thin wrapper around bench/gpu.py; extra arguments are passed through
# (e.g. --cpu-smoke to run the same code path on the CPU with tiny sizes).
#
# Run from the repository root:   bench/gpu.sh            (or DATA=... STEPS=... bench/gpu.sh)
# Environment:
#   DATA    dataset (.npz)      default ../shared/data/mnist10k.npz (relative to the cwd)
#   STEPS   training steps      default 300 (fewer if they would not fit the time budget)
#   PYTHON  interpreter         default .venv/bin/python if present, else python3
#   LIMIT_S hard wall limit     default 470 seconds
# Output: progress on stderr, one JSON object as the last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${DATA:-../shared/data/mnist10k.npz}"
STEPS="${STEPS:-300}"
LIMIT_S="${LIMIT_S:-470}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  elif [[ -x "$here/../.venv/bin/python" ]]; then PYTHON="$here/../.venv/bin/python"
  else PYTHON=python3
  fi
fi
if [[ ! -e "$DATA" ]]; then
  echo "gpu.sh: dataset not found: $DATA (set DATA=path/to/mnist10k.npz)" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader >&2 || true
fi
exec timeout --signal=INT --kill-after=10 "$LIMIT_S" \
  "$PYTHON" "$here/gpu.py" --data "$DATA" --train-steps "$STEPS" "$@"
