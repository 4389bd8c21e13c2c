#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/setup_env.sh
exec python -m pytest tests -q "$@"
