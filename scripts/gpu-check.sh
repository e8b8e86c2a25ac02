#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py; docs/benchmarks.md, "The GPU check"): parity with transformers on CUDA,
# decoding with CUDA graphs, one tiny run on the CPU and the GPU, DDP and FSDP2 on a one-process group, 124M
# training (tokens/s, MFU, peak memory against the plan), sliding windows against full attention.
# Under 8 minutes on one H100/H200, compilation included. The test suite never needs a GPU for it.
#   bash scripts/gpu-check.sh                                    # random GPT-2-shaped weights
#   bash scripts/gpu-check.sh --weights path/gpt2                # the real weights (a hub-layout folder)
#   bash scripts/gpu-check.sh --sections decoding,attention --budget 200   # some sections again
#   bash scripts/gpu-check.sh --smoke --out /tmp/smoke.json      # tiny sizes, CPU allowed (what the tests run)
# Results: benchmarks/results/gpu-check-<gpu>-<date>.json and .md, rewritten after every section (--out FILE).
# On a GPU machine lent through the device tool: the command is in scripts/device-gpu-check.md.
# The results name the checkout's git commit; in a copy without .git, set GPT2LAB_COMMIT=<hash> to name it.
#
# It runs from this checkout (PYTHONPATH=src): nothing needs installing but what gpt2lab imports. Missing
# packages are named first; then `pip install -e .` is tried (from the wheels in .whl/ if that folder exists,
# offline), and if that does not provide them, one error line names them.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

smoke=0
budget=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --smoke) smoke=1 ;;
        --budget) budget="${args[i + 1]:-}" ;;
        --budget=*) budget="${args[i]#--budget=}" ;;
    esac
done
[ -n "$budget" ] || budget=$([ "$smoke" = 1 ] && echo 150 || echo 420)  # benchmarks/gpu_check.py's defaults

# One interpreter start for both questions (importing torch takes seconds): 3 = no torch, 4 = no CUDA.
"$PYTHON" -c "import sys
try:
    import torch
except ImportError:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 4)" 2>/dev/null
found=$?
if [ "$found" != 0 ] && [ "$found" != 4 ]; then
    echo "error: $PYTHON cannot import torch: the GPU check runs on an installed PyTorch" >&2
    exit 1
fi
if [ "$smoke" = 0 ] && [ "$found" = 4 ]; then
    echo "error: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False): the GPU check needs one" >&2
    exit 1
fi

# What the check imports (gpt2lab's training loop pulls in the rest); prints the missing modules' names.
missing_modules() {
    "$PYTHON" - <<'PY'
import importlib

missing = []
for name in ("numpy", "tqdm", "tiktoken", "safetensors", "matplotlib", "transformers", "gpt2lab.train.loop"):
    try:
        importlib.import_module(name)
    except ImportError as error:
        missing.append(error.name or name)
print(" ".join(dict.fromkeys(missing)))
PY
}

missing=$(missing_modules)
if [ -n "$missing" ]; then
    offline=""
    [ -d .whl ] && offline=" (offline, from .whl/)"
    echo "note: $PYTHON cannot import $missing: trying pip install -e .$offline" >&2
    if [ -d .whl ]; then
        "$PYTHON" -m pip install -q --no-index --find-links .whl --no-build-isolation -e . >&2 \
            || "$PYTHON" -m pip install -q --no-index --no-deps .whl/*.whl >&2
    else
        "$PYTHON" -m pip install -q -e . >&2
    fi
    missing=$(missing_modules)
fi
if [ -n "$missing" ]; then
    echo "error: the GPU check needs $missing, which $PYTHON cannot import and pip could not install here" \
        "(bring wheels in .whl/: scripts/device-gpu-check.md)" >&2
    exit 1
fi

# The check stops its own sections at --budget seconds (SIGALRM per section); this outer timeout only catches a
# hang in native code: SIGTERM first (every finished section is already on disk), SIGKILL 20 s later.
timeout --signal=TERM --kill-after=20 "$((${budget%.*} + 40))" "$PYTHON" benchmarks/gpu_check.py "$@"
