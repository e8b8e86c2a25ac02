#!/usr/bin/env bash
# Set up (with test dependencies), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# The serve page test drives a real headless Chromium; it skips (saying why) where none can be installed.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "chromium could not be installed: the serve page test will skip" >&2
fi
.venv/bin/ruff check src tests benchmarks notebooks
.venv/bin/python -m pytest "$@"
