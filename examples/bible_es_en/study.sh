#!/usr/bin/env bash
# Does Weight Distillation pay? Ways to get the same small student from the same teacher and
# KD data, at the same number of training updates, on the whole Bible Es-En corpus. This is
# study v2; v1 (WD's phase 2 restarted its learning-rate schedule) is the records in
# study/*.json, made by this script as it was at commit 39d1285. The arms:
#   kd        KD: from scratch on original + KD data (stage kd_student)
#   sel       Selection + KD: wd-init-student's selection of the teacher, then KD's training
#             (stage sel_student)
#   slice_kd  the control: WD slice's start (phase 1's generators at step 0, materialised),
#             then the same KD training with no generator (sel_student, SEL_INIT=wd-slice)
#   wd        WD faithful: phase 1 (PHASE1 updates) + materialise + phase 2 (the rest)
#   wd_slice  the same with --wd-init slice
# Every arm trains on one learning-rate curve: inverse_sqrt, WARMUP updates from 1e-7 to LR
# from update 0; WD's phase 2 goes on along phase 1's curve (PHASE2_SCHEDULE=continue).
# Every arm and seed trains once, to LONG updates, keeping every save (200 updates apart); a
# budget B is read off that run: the average of its saves at updates B - 200 and B (WD:
# phase-2 saves, B counting phase 1; inverse_sqrt's rate does not depend on --max-update, so
# a run stopped at B would be the same). Budget 0 is each arm's start: the selection, WD
# slice's start (slice_kd's and wd_slice's) and WD faithful's, each materialised.
#
#   bash examples/bible_es_en/study.sh            # every part not finished yet, then report
#   bash examples/bible_es_en/study.sh seed1      # one part (see PARTS)
#   SCALE=2 bash examples/bible_es_en/study.sh    # the second scale point (see settings)
#   bash examples/bible_es_en/study.sh settings   # print the resolved settings; run nothing
#
# Parts (each resumes where it stopped; a finished part is reused, its results committed):
#   base    corpus, BPE, teacher (well past the benchmark's), KD data, the teacher's score
#   costs   CPU seconds of one update of each kind the arms train (KD student, WD phase 1
#           faithful and slice), timed interleaved on one thread: the report's time axis
#   seed1 seed2 seed3   every arm (SEED_ARMS) to LONG updates
#   restart wd_slice_restart: WD slice with the authors' restart of the schedule in phase 2
#           (PHASE2_WARMUP), seed VARIANT_SEED, against that seed's kd and sel
#   lr5e-4 lr2e-3   the learning-rate check: sel, wd_slice and wd at that peak rate, seed
#           VARIANT_SEED (whose own part is the check's LR=1e-3), scored at the largest budget
#           (and WD's at the end of phase 1) only: the starts are seed VARIANT_SEED's
#   report  the table, the paired bootstraps, the intervals over seeds and the plot
# Arms train two at a time, one CPU thread each, from one queue of the arms of every part
# asked for (a lane takes the next arm when its last one ends, so each arm trains beside
# another one and no core idles); a part is scored (one thread) once its arms are trained,
# while the lanes train the next parts' arms. STUDY (default work/study; SCALE=2: work/study-scale2) holds
# the runs; results go to OUT (default examples/bible_es_en/study/v2/; SCALE=2: v2-scale2/):
# PART.json (scores, wall-clocks, settings, stage times, machine load, the teacher's SHA-256)
# per finished part, and results.{md,json,png}.
set -euo pipefail

# Every setting can be overridden from the environment (tests run a tiny study so).
settings() {
  SCALE=${SCALE:-1}
  # SCALE=2, the second scale point: the CPU benchmark's teacher (4+4 x 256/1024/4) and its
  # student (decoder 1 x 128/512/4), Selection + KD against WD slice, budgets 0 and LONG
  if [ "$SCALE" = 2 ]; then
    export TEACHER_LAYERS=${TEACHER_LAYERS:-4} TEACHER_DIM=${TEACHER_DIM:-256} TEACHER_FFN=${TEACHER_FFN:-1024}
    export STUDENT_DEC_DIM=${STUDENT_DEC_DIM:-128} STUDENT_DEC_FFN=${STUDENT_DEC_FFN:-512}
    SEED_ARMS=${SEED_ARMS:-"sel wd_slice"} BUDGETS=${BUDGETS:-"0 ${LONG:-6400}"}
    PARTS=${PARTS:-"base costs seed1 seed2 seed3"}
  elif [ "$SCALE" != 1 ]; then
    echo "study.sh: SCALE=$SCALE: expected 1 (the study) or 2 (its second scale point)" >&2
    exit 1
  fi
  export SRC=${SRC:-es} TGT=${TGT:-en} PAIR_NAME=${PAIR_NAME:-"Bible Es-En study"}
  export BLEU_CONVENTION=${BLEU_CONVENTION:-moses}
  export BPE_MERGES=${BPE_MERGES:-8000} BPE_VOCAB_THRESHOLD=${BPE_VOCAB_THRESHOLD:-10}
  # teacher 3+3 layers x 128/512/4 heads; students: its encoder, decoder 1 x 64/256/4 (the
  # authors' stu1 shape, one decoder layer at half the width, at this scale)
  export TEACHER_LAYERS=${TEACHER_LAYERS:-3} TEACHER_DIM=${TEACHER_DIM:-128}
  export TEACHER_FFN=${TEACHER_FFN:-512} TEACHER_HEADS=${TEACHER_HEADS:-4}
  export STUDENT_DEC_LAYERS=${STUDENT_DEC_LAYERS:-1} STUDENT_DEC_DIM=${STUDENT_DEC_DIM:-64}
  export STUDENT_DEC_FFN=${STUDENT_DEC_FFN:-256} STUDENT_DEC_HEADS=${STUDENT_DEC_HEADS:-4}
  # CPU, fp32, 2,048-token batches; the authors' dropout 0.1 (pipeline defaults)
  export CPU=1 FP16=0 NUM_GPUS=1 MAX_TOKENS=${MAX_TOKENS:-2048} UPDATE_FREQ=1
  export BATCH_TOKENS=$MAX_TOKENS
  export LR=${LR:-1e-3} WARMUP=${WARMUP:-400} PHASE2_WARMUP=${PHASE2_WARMUP:-100}
  export PHASE2_SCHEDULE=continue SAVE_INTERVAL_UPDATES=${SAVE_INTERVAL_UPDATES:-200}
  # teacher: 8,000 updates of 2,048 tokens (2x the tokens of the benchmark teacher's 2,000 x
  # 4,096), the average of its last 3 epoch ends
  export TEACHER_UPDATES=${TEACHER_UPDATES:-8000} TEACHER_AVERAGE=${TEACHER_AVERAGE:-epochs} AVG_LAST=${AVG_LAST:-3}
  export PHASE2_AVG_LAST=2 KD_BEAM=${KD_BEAM:-6} BEAM=${BEAM:-6} KD_ENGINE=${KD_ENGINE:-}
  export SEL_LAYERS=${SEL_LAYERS:-spread} SEL_DIMS=${SEL_DIMS:-first}
  # WD's phase 1 is PHASE1 updates in every seed and budget
  PHASE1=${PHASE1:-1200} LONG=${LONG:-6400} VARIANT_SEED=${VARIANT_SEED:-1}
  BUDGETS=${BUDGETS:-"0 400 800 1200 1600 3200 4800 6400"}
  PARTS=${PARTS:-"base costs seed1 seed2 seed3 restart lr5e-4 lr2e-3"}
  # the arms of a seed part, in the order the lanes take them (see train_parts)
  SEED_ARMS=${SEED_ARMS:-"wd wd_slice kd sel slice_kd"}
}

main() {
  local repo part
  repo=$(cd "$HERE/../.." && pwd)
  source "$repo/examples/setup_env.sh"
  export PYTHON=python OMP_WAIT_POLICY=PASSIVE
  settings
  local suffix=
  [ "$SCALE" = 1 ] || suffix=-scale$SCALE
  STUDY=${STUDY:-$repo/work/study$suffix} OUT=${OUT:-$HERE/study/v2$suffix}
  local parts=("$@")
  [ ${#parts[@]} -gt 0 ] || parts=($PARTS report)
  for part in "${parts[@]}"; do
    case "$part" in
      base|costs|seed[0-9]*|restart|lr[0-9]*|report) ;;
      settings) show_settings; exit 0 ;;
      *) echo "study.sh: unknown part '$part'. Parts: $PARTS report (or settings)" >&2; exit 1 ;;
    esac
  done
  STUDY=$(mkdir -p "$STUDY" && cd "$STUDY" && pwd)
  export RAW_DIR=${RAW_DIR:-$STUDY/corpus}
  mkdir -p "$OUT"
  exec > >(tee -a "$STUDY/study.log") 2>&1
  # base first (every other part trains from it), then costs (timed alone), then the rest
  local todo=() first=() report=0
  for part in "${parts[@]}"; do
    if [ "$part" = report ]; then report=1
    elif [ -e "$OUT/$part.json" ]; then say "part $part: reused ($OUT/$part.json)"
    elif [ "$part" = base ]; then first=(base "${first[@]}")
    elif [ "$part" = costs ]; then first+=(costs)
    else todo+=("$part")
    fi
  done
  todo=("${first[@]}" "${todo[@]}")
  if [ "${todo[0]:-}" = base ]; then
    say "part base: start, load:$(load)"
    part_base
    say "part base: done, load:$(load)"
    todo=("${todo[@]:1}")
  fi
  if [ ${#todo[@]} -gt 0 ]; then
    if [ ! -e "$STUDY/base/done/evaluate" ]; then
      say "part ${todo[0]}: needs base's teacher and KD data in $STUDY/base, which is not there (finished)." \
        "Fix: run part base on this machine first (if $OUT/base.json came from another machine," \
        "move it away: the report refuses parts of two teachers)"
      exit 1
    fi
    local scored=0
    [ ! -e "$OUT/seed$VARIANT_SEED.json" ] || scored=1
    for part in "${todo[@]}"; do
      [ "$part" != "seed$VARIANT_SEED" ] || scored=1
      if [ "$part" = restart ] && [ "$scored" = 0 ]; then
        say "part restart: is scored against part seed$VARIANT_SEED's kd and sel. Fix: run part" \
          "seed$VARIANT_SEED first, or name it before restart"
        exit 1
      fi
    done
    if [ "${todo[0]}" = costs ]; then
      say "part costs: start, load:$(load)"
      part_costs
      todo=("${todo[@]:1}")
    fi
    [ ${#todo[@]} = 0 ] || train_parts "${todo[@]}"
  fi
  [ "$report" = 0 ] || report
}

say() { echo "[study $(date -u '+%F %T UTC')] $*"; }

# load: the machine's load averages (1, 5, 15 minutes)
load() { uptime | sed 's/.*load average://'; }

show_settings() {
  local name
  for name in SCALE TEACHER_LAYERS TEACHER_DIM TEACHER_FFN TEACHER_HEADS STUDENT_DEC_LAYERS \
      STUDENT_DEC_DIM STUDENT_DEC_FFN STUDENT_DEC_HEADS LR WARMUP PHASE1 LONG BUDGETS SEED_ARMS PARTS STUDY OUT; do
    echo "$name=${!name:-}"
  done
}

# stage WORK STAGE [VAR=VALUE ...]: one pipeline stage, its seconds appended to
# WORK/stage_times.tsv (a stage finished in an earlier run is skipped by the pipeline).
stage() {
  local work=$1 name=$2 t=$SECONDS
  shift 2
  [ -e "$work/done/$name" ] && return 0
  env "$@" WORK="$work" bash "$HERE/run.sh" "$name" > /dev/null
  printf '%s\t%s\n' "$name" $((SECONDS - t)) >> "$work/stage_times.tsv"
  say "${work##*/}: stage $name done in $((SECONDS - t))s"
}

part_base() {
  [ -e "$RAW_DIR/train.$SRC" ] || python "$HERE/corpus.py" "$RAW_DIR" > /dev/null
  local stage
  for stage in prepare teacher kd_data evaluate; do stage "$STUDY/base" "$stage" EVAL_MODELS=teacher; done
  python "$HERE/study.py" part --part base --run "$STUDY/base" --out "$OUT/base.json" \
    --command "bash examples/bible_es_en/study.sh base" --settings <(WORK=$STUDY/base bash "$HERE/run.sh" config)
}

# part_costs: the compute of one update of each kind the arms train (KD student, WD phase 1
# faithful and slice), timed interleaved on one thread from the commands the arms run
part_costs() {
  local run=$STUDY/costs init
  link "$run"
  for init in faithful slice; do
    WORK=$run SEED=$VARIANT_SEED KD_UPDATES=$LONG PHASE1_UPDATES=$PHASE1 PHASE2_UPDATES=$((LONG - PHASE1)) \
      WD_INIT=$init TRAIN_EXTRA="$(arm_train_extra)" bash "$HERE/run.sh" plan > "$run/plan-$init.txt"
  done
  OMP_NUM_THREADS=1 python "$HERE/update_costs.py" --plan faithful="$run/plan-faithful.txt" \
    --plan slice="$run/plan-slice.txt" --out "$OUT/costs.json" --command "bash examples/bible_es_en/study.sh costs"
}

# link WORK: a run with base's data, teacher and KD data
link() {
  local shared
  mkdir -p "$1/done"
  for shared in raw tok bpe data-bin data-bin-kd teacher; do ln -sfn "$STUDY/base/$shared" "$1/$shared"; done
  touch "$1/done/prepare" "$1/done/teacher" "$1/done/kd_data"
}

# every save kept; a log line at every save (its timestamp: the budget's wall-clock)
arm_train_extra() { echo "--keep-interval-updates -1 --log-interval $SAVE_INTERVAL_UPDATES"; }

# arm ARM SEED [VAR=VALUE ...]: train one arm (its own run directory, RUN_PREFIXseedSEED-ARM)
# to LONG updates, one CPU thread; a WD arm also gets its start materialised (step0.pt)
arm() {
  local name=$1 seed=$2 s
  shift 2
  local run=$STUDY/${RUN_PREFIX:-}seed$seed-$name
  local env=(SEED="$seed" KD_UPDATES="$LONG" PHASE1_UPDATES="$PHASE1" PHASE2_UPDATES=$((LONG - PHASE1))
    OMP_NUM_THREADS=1 TRAIN_EXTRA="$(arm_train_extra)" "$@")
  link "$run"
  case "$name" in
    kd) stage "$run" kd_student "${env[@]}" ;;
    sel) stage "$run" sel_student "${env[@]}" ;;
    slice_kd) stage "$run" sel_student "${env[@]}" SEL_INIT=wd-slice ;;
    wd*)
      local init=slice
      [ "$name" = wd ] && init=faithful
      [ "$name" = wd_slice_restart ] && env+=(PHASE2_SCHEDULE=restart)
      [ -e "$run/step0.pt" ] || OMP_NUM_THREADS=1 wd-init-student "$STUDY/base/teacher/checkpoint_avg.pt" \
        "$run/step0.pt" --data "$STUDY/base/data-bin" --init "wd-$init" --seed "$seed" \
        --decoder-layers "$STUDENT_DEC_LAYERS" --decoder-embed-dim "$STUDENT_DEC_DIM" \
        --decoder-ffn-embed-dim "$STUDENT_DEC_FFN" --decoder-attention-heads "$STUDENT_DEC_HEADS" > /dev/null
      for s in wd_phase1 materialize wd_phase2; do stage "$run" "$s" "${env[@]}" WD_INIT="$init"; done ;;
  esac
}

# arms_of PART: the arms PART trains, one line each: PART|RUN_PREFIX|SEED|ARM|VAR=VALUE ...
arms_of() {
  local arm
  case "$1" in
    restart) echo "restart||$VARIANT_SEED|wd_slice_restart|" ;;
    lr*) for arm in wd wd_slice sel; do echo "$1|$1-|$VARIANT_SEED|$arm|LR=${1#lr}"; done ;;
    *) for arm in $SEED_ARMS; do echo "$1||${1#seed}|$arm|"; done ;;
  esac
}

# train_parts PART...: the arms of every part through one queue served by two lanes, so
# no CPU waits while arms remain (a lane takes the next arm as its last one ends: a WD arm
# first in each part, its phase 1 costing more per update); each part is scored, in order,
# as soon as its arms are trained, while the lanes go on with the next parts' arms
train_parts() {
  local part failed=0 pid
  QUEUE=$STUDY/queue LANES=()
  rm -rf "$QUEUE" && mkdir -p "$QUEUE"
  for part in "$@"; do arms_of "$part"; done | awk '{ print NR "|" $0 }' > "$QUEUE/jobs"
  for part in "$@"; do say "part $part: queued, load:$(load)"; done
  for pid in 0 1; do lane "$QUEUE" & LANES+=($!); done
  # (an error from here on: the lanes finish the arms they train, then stop)
  trap 'touch "$QUEUE/stop"; wait "${LANES[@]}"' EXIT
  for part in "$@"; do
    until part_trained "$QUEUE" "$part"; do
      if compgen -G "$QUEUE/failed.*" > /dev/null || { ! any_alive "${LANES[@]}" && ! part_trained "$QUEUE" "$part"; }; then
        say "part $part: an arm failed; see $STUDY/*/logs/ (waiting for the other lane to stop)"
        exit 1
      fi
      sleep "${POLL_SECONDS:-10}"
    done
    say "part $part: arms trained, scoring, load:$(load)"
    case "$part" in
      restart) score restart "$VARIANT_SEED" "wd_slice_restart" --bases "$STUDY/seed$VARIANT_SEED-eval" ;;
      lr*) LR=${part#lr} RUN_PREFIX=$part- BUDGETS=$(printf '%s\n' $BUDGETS | sort -n | tail -n 1) \
             score "$part" "$VARIANT_SEED" "sel wd wd_slice" ;;
      *) score "$part" "${part#seed}" "$SEED_ARMS" ;;
    esac
    say "part $part: done, load:$(load)"
  done
  trap - EXIT
  for pid in "${LANES[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ]
}

# lane QUEUE: trains the queue's arms in order, each one no other lane has claimed
# (mkdir QUEUE/claim.N), marking it QUEUE/done.N or failed.N; stops after a failure anywhere
lane() {
  local queue=$1 n part prefix seed arm vars
  while IFS='|' read -r -u 3 n part prefix seed arm vars; do
    if [ -e "$queue/stop" ] || compgen -G "$queue/failed.*" > /dev/null; then return 0; fi
    mkdir "$queue/claim.$n" 2> /dev/null || continue
    # (in the background and waited for, so that set -e holds inside, as in a condition it would not)
    ( RUN_PREFIX=$prefix arm "$arm" "$seed" $vars ) &
    if wait $!; then touch "$queue/done.$n"; else touch "$queue/failed.$n"; return 1; fi
  done 3< "$queue/jobs"
}

# any_alive PID...: whether any of the processes runs
any_alive() {
  local pid
  for pid; do kill -0 "$pid" 2> /dev/null && return 0; done
  return 1
}

# part_trained QUEUE PART: whether every arm of PART is done
part_trained() {
  local n
  for n in $(awk -F'|' -v part="$2" '$2 == part { print $1 }' "$1/jobs"); do
    [ -e "$1/done.$n" ] || return 1
  done
}

# score PART SEED "ARMS" [study.py part flags]: every budget of every arm (runs
# RUN_PREFIXseedSEED-ARM) scored in one evaluate stage (run PART-eval), then the part's
# record OUT/PART.json
score() {
  local name=$1 seed=$2 arm arms=() models eval_run=$STUDY/$1-eval
  for arm in $3; do arms+=("$arm=$STUDY/${RUN_PREFIX:-}seed$seed-$arm"); done
  shift 3
  link "$eval_run"
  models=$(python "$HERE/study.py" budgets --arms "${arms[@]}" --budgets $BUDGETS \
    --interval "$SAVE_INTERVAL_UPDATES" --out "$eval_run/budgets")
  stage "$eval_run" evaluate OMP_NUM_THREADS=1 EVAL_MODELS="${models//=*([^ ])/}" EXTRA_MODELS="$models"
  python "$HERE/study.py" part --part "$name" --train-seed "$seed" --run "$eval_run" --arms "${arms[@]}" "$@" \
    --interval "$SAVE_INTERVAL_UPDATES" --out "$OUT/$name.json" --command "bash examples/bible_es_en/study.sh $name" \
    --settings <(WORK=$STUDY/${RUN_PREFIX:-}seed$seed-kd SEED=$seed KD_UPDATES=$LONG PHASE2_UPDATES=$((LONG - PHASE1)) \
      PHASE1_UPDATES=$PHASE1 TRAIN_EXTRA="$(arm_train_extra)" bash "$HERE/run.sh" config
      echo "study.sh: PHASE1=$PHASE1 LONG=$LONG BUDGETS=$BUDGETS (KD_TEMPERATURE=${KD_TEMPERATURE:-1})")
}

report() {
  local parts=() part
  for part in $PARTS; do [ -e "$OUT/$part.json" ] && parts+=("$OUT/$part.json"); done
  python "$HERE/study.py" report --parts "${parts[@]}" --out-prefix "$OUT/results"
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
shopt -s extglob
# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
