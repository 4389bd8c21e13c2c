#!/usr/bin/env bash
# CPU-scale benchmark of Weight Distillation against knowledge distillation at the same
# student size, on the whole Bible Es-En corpus (28,172 training pairs, 1,000 test pairs),
# through the full recipe (run.sh -> examples/recipes/pipeline.sh). About two hours on an
# idle 2-core CPU with the default single seed; each further seed adds about 45 minutes.
#
#   bash examples/bible_es_en/benchmark.sh              # resumes where an earlier run stopped
#   SEEDS="1 2 3" bash examples/bible_es_en/benchmark.sh
#
# Teacher: 4+4 layers x 256/1024/4 heads, 2,000 updates of 4,096 tokens (about 8 epochs).
# Students (KD and WD): the teacher's encoder and a decoder of 1 layer x 128/512/4 heads,
# the authors' stu1 shape (one decoder layer, half the width) at this scale, with the same
# number of updates: KD 1,600 = WD phase 1 1,200 + phase 2 400. KD data: beam 6 (the
# authors'). Every seed trains its own KD student, WD phase 1 and phase 2 with that --seed;
# the teacher and the KD data come from the first seed's run, whose directory the others
# link to. Update counts must be multiples of SAVE_INTERVAL_UPDATES (the checkpoints
# averaged at the end of a stage are the interval and epoch saves). Results: the paired bootstrap of WD - KD per seed (and
# averaged over seeds) with tools.py compare, written to $OUT (default: benchmark/ next to
# this script: results.md, results.json, results.png, and command.txt: the command, every
# setting, the time of each stage and the machine's load).
#
# WORK (default: work/bible_benchmark at the repository root) holds the runs (seedN/).
# Every setting below can be overridden from the environment (pipeline.sh documents them),
# RAW_DIR too (other raw text, e.g. a small subset from tools.py subset to try the script).
set -euo pipefail

main() {
  local here repo out seeds seed first run stage shared runs=()
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  repo=$(cd "$here/../.." && pwd)
  source "$repo/examples/setup_env.sh"
  export PYTHON=python
  WORK=${WORK:-$repo/work/bible_benchmark}
  out=${OUT:-$here/benchmark}
  seeds=${SEEDS:-1}

  export BPE_MERGES=${BPE_MERGES:-8000} BPE_VOCAB_THRESHOLD=${BPE_VOCAB_THRESHOLD:-10}
  export TEACHER_LAYERS=${TEACHER_LAYERS:-4} TEACHER_DIM=${TEACHER_DIM:-256}
  export TEACHER_FFN=${TEACHER_FFN:-1024} TEACHER_HEADS=${TEACHER_HEADS:-4}
  export STUDENT_DEC_LAYERS=${STUDENT_DEC_LAYERS:-1} STUDENT_DEC_DIM=${STUDENT_DEC_DIM:-128}
  export STUDENT_DEC_FFN=${STUDENT_DEC_FFN:-512} STUDENT_DEC_HEADS=${STUDENT_DEC_HEADS:-4}
  export CPU=1 FP16=0 NUM_GPUS=1 MAX_TOKENS=${MAX_TOKENS:-4096} UPDATE_FREQ=${UPDATE_FREQ:-1}
  # one process: BATCH_TOKENS is this batch. The README's numbers were measured with no
  # attention/activation dropout and the teacher averaged over saves (not the authors'
  # dropout 0.1 and epoch averaging, the recipes' defaults), so those stay pinned here.
  export BATCH_TOKENS=${BATCH_TOKENS:-$((MAX_TOKENS * UPDATE_FREQ))}
  export ATTENTION_DROPOUT=${ATTENTION_DROPOUT:-0} ACTIVATION_DROPOUT=${ACTIVATION_DROPOUT:-0}
  export TEACHER_AVERAGE=${TEACHER_AVERAGE:-updates}
  export LR=${LR:-1e-3} WARMUP=${WARMUP:-400} PHASE2_WARMUP=${PHASE2_WARMUP:-100}
  export TEACHER_UPDATES=${TEACHER_UPDATES:-2000} KD_UPDATES=${KD_UPDATES:-1600}
  export PHASE1_UPDATES=${PHASE1_UPDATES:-1200} PHASE2_UPDATES=${PHASE2_UPDATES:-400}
  export SAVE_INTERVAL_UPDATES=${SAVE_INTERVAL_UPDATES:-200} AVG_LAST=${AVG_LAST:-3}
  # phase 2 (400 updates) has two saves: the committed results average those two
  export PHASE2_AVG_LAST=${PHASE2_AVG_LAST:-2}
  export WORKERS=${WORKERS:-$(nproc)}
  export KD_BEAM=${KD_BEAM:-6} BEAM=${BEAM:-6} SPEED_BATCH_SIZE=${SPEED_BATCH_SIZE:-1}
  # KD data: wd-kd-data's default engine (CTranslate2 int8 on the CPU). The committed
  # results were made with KD_ENGINE=fairseq (fairseq's beam search), before that default.
  export KD_ENGINE=${KD_ENGINE:-}
  export GENERATE_EXTRA=${GENERATE_EXTRA:-"--max-len-a 1.5 --max-len-b 10"}

  mkdir -p "$WORK"
  exec > >(tee -a "$WORK/benchmark.log") 2>&1
  echo "[benchmark] start $(date -u '+%F %T UTC'), load:$(uptime | sed 's/.*load average://')"
  if [ -z "${RAW_DIR:-}" ]; then
    export RAW_DIR=$WORK/corpus
    python "$here/corpus.py" "$RAW_DIR" > /dev/null
  fi
  first=${seeds%% *}
  for seed in $seeds; do
    run=$WORK/seed$seed
    if [ "$seed" != "$first" ]; then
      # the first seed's data, teacher and KD data
      mkdir -p "$run/done"
      for shared in raw tok bpe data-bin data-bin-kd teacher; do ln -sfn "../seed$first/$shared" "$run/$shared"; done
      for stage in prepare teacher kd_data; do touch "$run/done/$stage"; done
    fi
    echo "[benchmark] seed $seed: $run"
    WORK=$run SEED=$seed STAGES_TAG="seed $seed" bash "$here/stages.sh"
    runs+=("seed$seed=$run")
  done
  echo "[benchmark] end $(date -u '+%F %T UTC'), load:$(uptime | sed 's/.*load average://')"
  mkdir -p "$out"
  python "$here/tools.py" compare --work "${runs[@]}" --out-prefix "$out/results" \
    --title "WD vs KD on Bible Es-En ($(wc -l < "$RAW_DIR/train.es") training pairs, CPU)" \
    --note "teacher ${TEACHER_LAYERS}+${TEACHER_LAYERS} x ${TEACHER_DIM}/${TEACHER_FFN}; students: decoder ${STUDENT_DEC_LAYERS} x ${STUDENT_DEC_DIM}/${STUDENT_DEC_FFN}; updates: teacher ${TEACHER_UPDATES}, KD ${KD_UPDATES}, WD ${PHASE1_UPDATES} + ${PHASE2_UPDATES}" \
    --note "speed: beam $BEAM, batch size $SPEED_BATCH_SIZE, one CPU thread"
  {
    echo "# $(nproc) CPUs; settings of the first seed's run below, stage times and load at the end"
    echo "SEEDS=\"$seeds\" bash examples/bible_es_en/benchmark.sh"
    WORK=$WORK/seed$first bash "$here/run.sh" config
    echo "# from $WORK/benchmark.log:"
    grep -E '^\[benchmark\] (start|end)|stage [a-z_0-9]+: done in' "$WORK/benchmark.log"
  } > "$out/command.txt"
  echo "[benchmark] results: $out/results.md $out/results.json $out/results.png $out/command.txt"
}

# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
