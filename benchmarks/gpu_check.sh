#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine with Python 3.12 and torch but no
# package index: installs the wheelhouse of benchmarks/gpu_wheelhouse.sh and this
# repository into a virtual environment layered over the machine's own Python (its torch
# is reused, never replaced), then runs benchmarks/gpu_check.py (about 8 minutes).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEELHOUSE]    (default wheelhouse: .whl)
#
# Results: OUT_DIR/gpu_check.json, the benchmarks' JSON files, logs.tar.gz.
# Settings: GPU_CHECK_PYTHON (the machine's interpreter; default python3), GPU_CHECK_VENV
# (default /tmp/wd-gpu-check-venv), GPU_CHECK_WORK (scratch; default /tmp/wd-gpu-check);
# GPU_CHECK_ARGS adds flags of gpu_check.py (e.g. "--parts smoke,phase1", "--dry-run").
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [WHEELHOUSE]}
WHEELS=${2:-$REPO/.whl}
BASE=${GPU_CHECK_PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-/tmp/wd-gpu-check-venv}
WORK=${GPU_CHECK_WORK:-/tmp/wd-gpu-check}
if [ ! -d "$WHEELS" ]; then
  echo "gpu_check.sh: no wheelhouse at $WHEELS. Fix: run 'bash benchmarks/gpu_wheelhouse.sh'" \
    "where pip reaches an index, and bring that folder along" >&2
  exit 1
fi
start=$(date +%s)
# A virtual environment whose own site-packages come first, then the machine's (torch).
"$BASE" -m venv --without-pip --clear "$VENV"
base_site=$("$BASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$base_site')" > "$venv_site/_machine_site.pth"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps)
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  "${PIP[@]}" --no-compile "${wheels[@]}"
fi
# This checkout, as users install it (console scripts, the wd_fairseq.pth start-up hook).
"${PIP[@]}" --no-build-isolation "$REPO"
base_bin=$("$BASE" -c 'import os, sys; print(os.path.dirname(sys.executable))')
export PATH="$VENV/bin:$base_bin:$PATH"
echo "[gpu-check] environment ready in $(( $(date +%s) - start )) s ($("$VENV/bin/python" -c \
  'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)' 2>/dev/null))"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of flags
exec "$VENV/bin/python" "$REPO/benchmarks/gpu_check.py" --out "$OUT_DIR" --work "$WORK" \
  ${GPU_CHECK_ARGS:-}
