#!/usr/bin/env bash
# Every stage of run.sh (examples/recipes/pipeline.sh) in order, with a line per stage and
# its elapsed time; used by examples/demo.sh and benchmark.sh, settings from the environment.
#
#   WORK=... [other pipeline settings] bash examples/bible_es_en/stages.sh
#
# kd_student and wd_phase1 need only the teacher and the KD data: they run side by side,
# one CPU thread each, their lines prefixed with the stage name. The speed stage decodes
# with one CPU thread (reproducible, and comparable across machines). Other stages use
# torch's default threads; idle threads sleep instead of spinning (OMP_WAIT_POLICY), which
# keeps a busy machine from slowing training down several times over.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${WORK:?set WORK}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
START=$SECONDS
clock() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
say() { echo "[${STAGES_TAG:-stages} $(clock $((SECONDS - START)))] $*"; }

# run_one STAGE [VAR=VALUE ...]: one stage through run.sh, unless an earlier run finished it.
run_one() {
  local stage=$1 t=$SECONDS; shift
  if [ -e "$WORK/done/$stage" ]; then
    say "stage $stage: reused (finished in an earlier run)"
    return 0
  fi
  say "stage $stage: start"
  env "$@" bash "$HERE/run.sh" "$stage"
  say "stage $stage: done in $(clock $((SECONDS - t)))"
}

# run_side_by_side STAGE...: the stages at once, one thread each; fails if any fails.
run_side_by_side() {
  local stage pid pids=() failed=0
  for stage in "$@"; do
    ( run_one "$stage" OMP_NUM_THREADS=1 2>&1 | sed -u "s/^/[$stage] /" ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || { say "a stage failed; see $WORK/logs/"; exit 1; }
}

main() {
  run_one prepare
  run_one teacher
  run_one kd_data
  run_side_by_side kd_student wd_phase1
  run_one materialize
  run_one wd_phase2
  run_one evaluate
  run_one speed OMP_NUM_THREADS=1
  say "all stages done"
}

# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
