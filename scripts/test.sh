#!/usr/bin/env bash
# Set up (with test dependencies), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check src tests benchmarks notebooks
.venv/bin/python -m pytest "$@"
