#!/usr/bin/env bash
# The GPU check: parity with transformers on CUDA, 50 steps of GPT-2 124M in bf16 with torch.compile
# (tokens/s, MFU, peak memory vs the plan), sliding window vs full attention, decoding vs transformers.
# About 3-5 minutes on one GPU (budgeted under 8). The test suite never needs it.
#   bash scripts/gpu-check.sh                       # random GPT-2-shaped weights
#   bash scripts/gpu-check.sh --weights path/gpt2   # the real weights (a hub-layout folder)
# Results: benchmarks/results/gpu-check.json and .md (for docs/benchmarks.md); --out FILE to change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False): the GPU check needs one" >&2
    exit 1
fi
if ! "$PYTHON" -c "import transformers" 2>/dev/null; then
    echo "error: the GPU check compares with transformers: $PYTHON -m pip install transformers" >&2
    exit 1
fi
"$PYTHON" -c "import torch; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
