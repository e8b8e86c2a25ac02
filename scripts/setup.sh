#!/usr/bin/env bash
# Create .venv and install gpt2lab into it. torch is installed first and pinned: a later unpinned
# requirement would otherwise pull a multi-GB CUDA build on machines that only need the CPU one.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   plus pytest, hypothesis, ruff, transformers (the test reference), lm-eval and
#                                  nbclient/ipykernel (the harness and notebook extras the tests exercise)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q -e ".${extra}"
.venv/bin/python -c "import gpt2lab, torch; print(f'gpt2lab {gpt2lab.__version__} ready (torch {torch.__version__})')"
