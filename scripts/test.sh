#!/usr/bin/env bash
# The whole test suite (sets up its own venv on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
ruff check .
python -m pytest --durations=25 "$@"  # lists the 25 slowest tests
