#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install wd_fairseq into it, with the
# extras of the tests and the demo.
# Usage: source examples/setup_env.sh   (or run it; it prints the venv path)
# WD_VENV overrides the location (default: .venv at the repository root);
# PYTHON picks the interpreter used to create it (default: python3).
set -euo pipefail
WD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WD_VENV=${WD_VENV:-$WD_ROOT/.venv}
if [ ! -x "$WD_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $WD_VENV"
  "${PYTHON:-python3}" -m venv "$WD_VENV"
fi
# No pip pin: fairseq-fixed 0.12.3.1 (hydra-core 1.3, omegaconf 2.3) resolves and installs
# with current pip (checked with pip 26.3); only fairseq 0.12.2's omegaconf<2.1 needed pip<24.1.
if "$WD_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fairseq') is None)"; then
  echo "[setup] updating wd_fairseq in $WD_VENV"
else
  echo "[setup] installing wd_fairseq and its pinned dependencies (first time on Python 3.11: fairseq-fixed compiles, ~11 min)"
fi
"$WD_VENV/bin/python" -m pip install -q --disable-pip-version-check "$WD_ROOT[test,demo]"
export PATH="$WD_VENV/bin:$PATH"
