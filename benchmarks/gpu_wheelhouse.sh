#!/usr/bin/env bash
# Wheels that a GPU machine without a package index needs to run benchmarks/gpu_check.sh:
# fairseq-fixed and the dependencies its image lacks (never torch: the check reuses the
# machine's own), for CPython 3.12 on manylinux x86-64.
#
#   bash benchmarks/gpu_wheelhouse.sh [DIR]      (default: .whl at the repository root)
#
# GPU_WHEELHOUSE_CTRANSLATE2=1 adds ctranslate2 (43 MB). Prints the wheelhouse's size and
# what travels with it (the tracked and untracked files) against a 64 MiB limit.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$REPO/.whl}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=64
# What the image lacks (its python3 has torch, numpy, sacrebleu, regex, pyyaml, ...).
WHEELS=(fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3
        sacremoses==0.2.0)
[ "${GPU_WHEELHOUSE_CTRANSLATE2:-0}" = 1 ] && WHEELS+=(ctranslate2==4.8.5)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

rm -rf "$DIR.partial"
mkdir -p "$DIR.partial"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DIR.partial" "${WHEELS[@]}"
# antlr4-python3-runtime (hydra-core's parser) is published as source only: build its
# pure-Python wheel here.
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIR.partial" \
  antlr4-python3-runtime==4.9.3
rm -rf "$DIR"
mv "$DIR.partial" "$DIR"

"$PYTHON" - "$DIR" "$REPO" "$LIMIT_MIB" <<'PY'
import subprocess, sys
from pathlib import Path

wheels, repo, limit = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
size = lambda paths: sum(p.stat().st_size for p in paths if p.is_file()) / 2**20
listed = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others",
                         "--exclude-standard"], capture_output=True, text=True).stdout
tree = size(repo / f for f in listed.split("\0") if f)
house = size(wheels.iterdir())
for wheel in sorted(wheels.iterdir()):
    print(f"  {wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
total = house + tree
print(f"wheelhouse {house:.1f} MiB + working tree {tree:.1f} MiB = {total:.1f} MiB "
      f"(limit {limit:.0f} MiB): {'fits' if total <= limit else 'TOO LARGE: split the check'}")
sys.exit(0 if total <= limit else 1)
PY
