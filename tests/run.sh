#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the whole test suite: one pytest worker per
# CPU core (pytest-xdist), each test file on one worker (its module fixtures built once),
# and the 15 slowest tests listed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/setup_env.sh
exec python -m pytest tests -q -n auto --dist loadfile --no-loadscope-reorder --durations=15 "$@"
