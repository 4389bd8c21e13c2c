#!/usr/bin/env bash
# Does Weight Distillation pay? Four ways to get the same small student from the same teacher
# and KD data, at the same number of training updates, on the whole Bible Es-En corpus:
#   kd        KD: from scratch on original + KD data (stage kd_student)
#   sel       Selection + KD: wd-init-student's selection of the teacher, then KD's training
#             (stage sel_student)
#   wd        WD faithful: phase 1 (PHASE1 updates) + materialise + phase 2 (the rest)
#   wd_slice  the same with --wd-init slice
# and, in part variants (seed VARIANT_SEED, compared with that seed's kd and sel), two
# variants of WD slice:
#   wd_slice_long  phase 1 PHASE1_LONG updates instead of PHASE1
#   wd_slice_word  word-level KD in phase 1 (KD_ALPHA=VARIANT_KD_ALPHA, the teacher inside
#                  the phase-1 model)
# Every arm and seed trains once, to its largest budget, keeping every save (200 updates
# apart); a budget B is read off that run: the average of its saves at updates B - 200 and B
# (WD: phase-2 saves, B counting phase 1; inverse_sqrt's learning rate does not depend on
# --max-update, so a run stopped at B would be the same). WD's phase split is fixed.
#
#   bash examples/bible_es_en/study.sh            # every part not finished yet, then report
#   bash examples/bible_es_en/study.sh seed1      # one part (see PARTS)
#
# Parts (each resumes where it stopped; a finished part is reused, its results committed):
#   base    corpus, BPE, teacher (well past the benchmark's), KD data, the teacher's score
#   seed1 seed2   every arm to LONG updates (4 arms on 2 CPU threads: ~1 hour each)
#   seed3   every arm to SHORT updates
#   variants  the two variants of WD slice to LONG updates (seed VARIANT_SEED: its part first)
#   report  the table, the paired bootstraps and the plot from the finished parts
# Arms train two at a time, one CPU thread each (each arm beside another one, so their
# training wall-clocks compare). STUDY (default work/study) holds the runs; results go to
# OUT (default examples/bible_es_en/study/): PART.json (scores, wall-clocks, settings, stage
# times, machine load) per finished part, and results.{md,json,png}.
set -euo pipefail

# Every setting can be overridden from the environment (tests run a tiny study so).
settings() {
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
  export SAVE_INTERVAL_UPDATES=${SAVE_INTERVAL_UPDATES:-200}
  # teacher: 8,000 updates of 2,048 tokens (2x the tokens of the benchmark teacher's 2,000 x
  # 4,096), the average of its last 3 epoch ends
  export TEACHER_UPDATES=${TEACHER_UPDATES:-8000} TEACHER_AVERAGE=${TEACHER_AVERAGE:-epochs} AVG_LAST=${AVG_LAST:-3}
  export PHASE2_AVG_LAST=2 KD_BEAM=${KD_BEAM:-6} BEAM=${BEAM:-6} KD_ENGINE=${KD_ENGINE:-}
  export SEL_LAYERS=${SEL_LAYERS:-spread} SEL_DIMS=${SEL_DIMS:-first}
  # WD's phase 1 is PHASE1 updates in every seed and budget; seeds 1 and 2 train to LONG
  # updates, the others to SHORT
  PHASE1=${PHASE1:-1200} LONG=${LONG:-6400} SHORT=${SHORT:-1600}
  PHASE1_LONG=${PHASE1_LONG:-3200} VARIANT_KD_ALPHA=${VARIANT_KD_ALPHA:-0.5} VARIANT_SEED=${VARIANT_SEED:-1}
  LONG_BUDGETS=${LONG_BUDGETS:-"400 800 1600 3200 4800 6400"} SHORT_BUDGETS=${SHORT_BUDGETS:-"400 800 1600"}
  PARTS=${PARTS:-"base seed1 seed2 seed3 variants"} LONG_SEEDS=${LONG_SEEDS:-"1 2"}
}

main() {
  local repo part
  repo=$(cd "$HERE/../.." && pwd)
  source "$repo/examples/setup_env.sh"
  export PYTHON=python OMP_WAIT_POLICY=PASSIVE
  settings
  STUDY=$(mkdir -p "${STUDY:-$repo/work/study}" && cd "${STUDY:-$repo/work/study}" && pwd)
  OUT=${OUT:-$HERE/study}
  export RAW_DIR=${RAW_DIR:-$STUDY/corpus}
  mkdir -p "$OUT"
  local parts=("$@")
  [ ${#parts[@]} -gt 0 ] || parts=($PARTS report)
  for part in "${parts[@]}"; do
    case "$part" in
      base|seed[0-9]*|variants|report) ;;
      *) echo "study.sh: unknown part '$part'. Parts: $PARTS report" >&2; exit 1 ;;
    esac
  done
  exec > >(tee -a "$STUDY/study.log") 2>&1
  for part in "${parts[@]}"; do
    if [ "$part" = report ]; then report; continue; fi
    if [ -e "$OUT/$part.json" ]; then say "part $part: reused ($OUT/$part.json)"; continue; fi
    say "part $part: start, load:$(uptime | sed 's/.*load average://')"
    case "$part" in
      base) part_base ;;
      variants) part_variants ;;
      *) part_seed "${part#seed}" ;;
    esac
    say "part $part: done, load:$(uptime | sed 's/.*load average://')"
  done
}

say() { echo "[study $(date -u '+%F %T UTC')] $*"; }

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

# link WORK: a run with base's data, teacher and KD data
link() {
  local shared
  mkdir -p "$1/done"
  for shared in raw tok bpe data-bin data-bin-kd teacher; do ln -sfn "$STUDY/base/$shared" "$1/$shared"; done
  touch "$1/done/prepare" "$1/done/teacher" "$1/done/kd_data"
}

# every save kept; a log line at every save (its timestamp: the budget's wall-clock)
arm_train_extra() { echo "--keep-interval-updates -1 --log-interval $SAVE_INTERVAL_UPDATES"; }

# arm ARM SEED UPDATES: train one arm (its own run directory) to UPDATES, one CPU thread
arm() {
  local run=$STUDY/seed$2-$1 s
  local phase1=$PHASE1
  [ "$1" = wd_slice_long ] && phase1=$PHASE1_LONG
  local env=(SEED="$2" KD_UPDATES="$3" PHASE1_UPDATES="$phase1" PHASE2_UPDATES=$(($3 - phase1))
    OMP_NUM_THREADS=1 TRAIN_EXTRA="$(arm_train_extra)")
  link "$run"
  case "$1" in
    kd) stage "$run" kd_student "${env[@]}" ;;
    sel) stage "$run" sel_student "${env[@]}" ;;
    wd*)
      [ "$1" = wd ] && env+=(WD_INIT=faithful) || env+=(WD_INIT=slice)
      # (phase 2 trains with label-smoothed CE whatever KD_ALPHA says)
      [ "$1" = wd_slice_word ] && env+=(KD_ALPHA="$VARIANT_KD_ALPHA")
      for s in wd_phase1 materialize wd_phase2; do stage "$run" "$s" "${env[@]}"; done ;;
  esac
}

# part_seed SEED: the four arms (two at a time), then every budget of every arm scored in
# one evaluate stage (run seedSEED-eval) and the part's record
part_seed() {
  local seed=$1 updates budgets pids=() failed=0 pid arm models
  if [[ " $LONG_SEEDS " == *" $seed "* ]]; then updates=$LONG budgets=$LONG_BUDGETS; else updates=$SHORT budgets=$SHORT_BUDGETS; fi
  # WD's phase 1 costs more per update: each WD arm first, beside the other
  ( arm wd "$seed" "$updates"; arm kd "$seed" "$updates" ) & pids+=($!)
  ( arm wd_slice "$seed" "$updates"; arm sel "$seed" "$updates" ) & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || { say "seed $seed: an arm failed; see $STUDY/seed$seed-*/logs/"; exit 1; }
  score "seed$seed" "$seed" "$updates" "$budgets" "kd sel wd wd_slice"
}

# part_variants: the variants of WD slice beside each other, scored against the kd and sel
# of seed VARIANT_SEED (whose part must be finished)
part_variants() {
  local seed=$VARIANT_SEED pids=() failed=0 pid
  [ -e "$OUT/seed$seed.json" ] || { say "part variants: needs part seed$seed first"; exit 1; }
  ( arm wd_slice_long "$seed" "$LONG" ) & pids+=($!)
  ( arm wd_slice_word "$seed" "$LONG" ) & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || { say "variants: an arm failed; see $STUDY/seed$seed-wd_slice_*/logs/"; exit 1; }
  score variants "$seed" "$LONG" "$LONG_BUDGETS" "wd_slice_long wd_slice_word" --bases "$STUDY/seed$seed-eval"
}

# score PART SEED UPDATES "BUDGETS" "ARMS" [study.py part flags]: every budget of every arm
# scored in one evaluate stage (run PART-eval), then the part's record OUT/PART.json
score() {
  local name=$1 seed=$2 updates=$3 budgets=$4 arm arms=() models eval_run
  eval_run=$STUDY/$name-eval
  for arm in $5; do arms+=("$arm=$STUDY/seed$seed-$arm"); done
  shift 5
  link "$eval_run"
  models=$(python "$HERE/study.py" budgets --arms "${arms[@]}" --budgets $budgets \
    --interval "$SAVE_INTERVAL_UPDATES" --out "$eval_run/budgets")
  stage "$eval_run" evaluate EVAL_MODELS="${models//=*([^ ])/}" EXTRA_MODELS="$models"
  python "$HERE/study.py" part --part "$name" --train-seed "$seed" --run "$eval_run" --arms "${arms[@]}" "$@" \
    --interval "$SAVE_INTERVAL_UPDATES" --out "$OUT/$name.json" --command "bash examples/bible_es_en/study.sh $name" \
    --settings <(WORK=$STUDY/seed$seed-kd SEED=$seed KD_UPDATES=$updates PHASE2_UPDATES=$((updates - PHASE1)) \
      PHASE1_UPDATES=$PHASE1 TRAIN_EXTRA="$(arm_train_extra)" bash "$HERE/run.sh" config
      echo "study.sh: PHASE1=$PHASE1 PHASE1_LONG=$PHASE1_LONG VARIANT_KD_ALPHA=$VARIANT_KD_ALPHA (KD_TEMPERATURE=${KD_TEMPERATURE:-1})")
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
