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
# A stamp of what was installed (setup.py and the package's files): an unchanged checkout is
# not installed again.
WD_STAMP=$("$WD_VENV/bin/python" -c 'import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
digest = hashlib.sha256()
for path in sorted([root / "setup.py", *(root / "wd_fairseq").rglob("*")]):
    if path.is_file() and "__pycache__" not in path.parts:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
print(digest.hexdigest())' "$WD_ROOT")
if ! "$WD_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fairseq') is None)"; then
  echo "[setup] installing wd_fairseq and its pinned dependencies (first time on Python 3.11: fairseq-fixed compiles, ~11 min)"
  "$WD_VENV/bin/python" -m pip install -q --disable-pip-version-check "$WD_ROOT[test,demo]"
elif [ "$(cat "$WD_VENV/.wd_fairseq.stamp" 2>/dev/null)" != "$WD_STAMP" ] \
    || ! "$WD_VENV/bin/python" -I -c "import importlib.util as u, sys; sys.exit(u.find_spec('wd_fairseq') is None)"; then
  echo "[setup] updating wd_fairseq in $WD_VENV"
  "$WD_VENV/bin/python" -m pip install -q --disable-pip-version-check "$WD_ROOT[test,demo]"
else
  echo "[setup] wd_fairseq in $WD_VENV is this checkout's"
fi
echo "$WD_STAMP" > "$WD_VENV/.wd_fairseq.stamp"
# (kept as it is where the venv's bin is on PATH already: what a caller put before it stays first)
case ":$PATH:" in *":$WD_VENV/bin:"*) ;; *) export PATH="$WD_VENV/bin:$PATH" ;; esac
