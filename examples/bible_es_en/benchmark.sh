#!/usr/bin/env bash
# CPU-scale benchmark of Weight Distillation against knowledge distillation at the same
# student size, on the whole Bible Es-En corpus (28,172 training pairs, 1,000 test pairs),
# through the full recipe (run.sh -> examples/recipes/pipeline.sh). About two hours on an
# idle 2-core CPU with the default single seed; each further seed adds about 40 minutes.
#
#   bash examples/bible_es_en/benchmark.sh              # resumes where an earlier run stopped
#   SEEDS="1 2 3" bash examples/bible_es_en/benchmark.sh
#
# Teacher: 4+4 layers x 256/1024/4 heads. Students (KD and WD): the teacher's encoder and
# a decoder of 1 layer x 128/512/4 heads: the authors' stu1 shape (one decoder layer, half
# the width) at this scale. Every seed trains its own KD student, WD phase 1 and phase 2
# with that --seed; the teacher and the KD data come from the first seed's run, whose
# directory the others link to. Results: the paired bootstrap of WD - KD per seed (and
# averaged over seeds) with tools.py compare, written to $OUT (default: benchmark/ next to
# this script: results.md, results.json, results.png, command.txt).
#
# WORK (default: work/bible_benchmark at the repository root) holds the runs (seedN/).
# Every setting below can be overridden from the environment (pipeline.sh documents them).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
source "$REPO/examples/setup_env.sh"
export PYTHON=python
WORK=${WORK:-$REPO/work/bible_benchmark}
OUT=${OUT:-$HERE/benchmark}
SEEDS=${SEEDS:-1}

export BPE_MERGES=${BPE_MERGES:-8000} BPE_VOCAB_THRESHOLD=${BPE_VOCAB_THRESHOLD:-10}
export TEACHER_LAYERS=${TEACHER_LAYERS:-4} TEACHER_DIM=${TEACHER_DIM:-256}
export TEACHER_FFN=${TEACHER_FFN:-1024} TEACHER_HEADS=${TEACHER_HEADS:-4}
export STUDENT_DEC_LAYERS=${STUDENT_DEC_LAYERS:-1} STUDENT_DEC_DIM=${STUDENT_DEC_DIM:-128}
export STUDENT_DEC_FFN=${STUDENT_DEC_FFN:-512} STUDENT_DEC_HEADS=${STUDENT_DEC_HEADS:-4}
export CPU=1 FP16=0 NUM_GPUS=1 MAX_TOKENS=${MAX_TOKENS:-4096} UPDATE_FREQ=${UPDATE_FREQ:-1}
export LR=${LR:-1e-3} WARMUP=${WARMUP:-500} PHASE2_WARMUP=${PHASE2_WARMUP:-100}
export TEACHER_UPDATES=${TEACHER_UPDATES:-2000} KD_UPDATES=${KD_UPDATES:-1200}
export PHASE1_UPDATES=${PHASE1_UPDATES:-1000} PHASE2_UPDATES=${PHASE2_UPDATES:-400}
export SAVE_INTERVAL_UPDATES=${SAVE_INTERVAL_UPDATES:-200} AVG_LAST=${AVG_LAST:-5}
export WORKERS=${WORKERS:-$(nproc)}
export KD_BEAM=${KD_BEAM:-6} BEAM=${BEAM:-6} SPEED_BATCH_SIZE=${SPEED_BATCH_SIZE:-1}
export GENERATE_EXTRA=${GENERATE_EXTRA:-"--max-len-a 1.5 --max-len-b 10"}

START=$SECONDS
mkdir -p "$WORK"
export RAW_DIR=$WORK/corpus
python "$HERE/corpus.py" "$RAW_DIR" > /dev/null
set -- $SEEDS
first=$1 runs=()
for seed in $SEEDS; do
  run=$WORK/seed$seed
  if [ "$seed" != "$first" ]; then
    # the first seed's data, teacher and KD data
    mkdir -p "$run/done"
    for shared in raw tok bpe data-bin data-bin-kd teacher; do ln -sfn "../seed$first/$shared" "$run/$shared"; done
    for stage in prepare teacher kd_data; do touch "$run/done/$stage"; done
  fi
  echo "[benchmark] seed $seed: $run"
  WORK=$run SEED=$seed STAGES_TAG="seed $seed" bash "$HERE/stages.sh"
  runs+=("seed$seed=$run")
done
mkdir -p "$OUT"
python "$HERE/tools.py" compare --work "${runs[@]}" --out-prefix "$OUT/results" \
  --title "WD vs KD on Bible Es-En (full corpus, CPU)" \
  --note "teacher ${TEACHER_LAYERS}+${TEACHER_LAYERS} x ${TEACHER_DIM}/${TEACHER_FFN}; students: decoder ${STUDENT_DEC_LAYERS} x ${STUDENT_DEC_DIM}/${STUDENT_DEC_FFN}; updates: teacher ${TEACHER_UPDATES}, KD ${KD_UPDATES}, WD ${PHASE1_UPDATES} + ${PHASE2_UPDATES}" \
  --note "speed: beam $BEAM, batch size $SPEED_BATCH_SIZE, one CPU thread"
{
  echo "# $(date -u '+%F %T UTC'), $(nproc) CPUs, $(( (SECONDS - START) / 60 )) min for this invocation"
  echo "SEEDS=\"$SEEDS\" bash examples/bible_es_en/benchmark.sh"
  (cd "$REPO" && WORK=$WORK/seed$first bash "$HERE/run.sh" config)
} > "$OUT/command.txt"
echo "[benchmark] results: $OUT/results.md $OUT/results.json $OUT/results.png $OUT/command.txt"
