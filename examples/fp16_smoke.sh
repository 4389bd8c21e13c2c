#!/usr/bin/env bash
# fp16 smoke test on a GPU, one command: a tiny teacher (fairseq-train --fp16), WD phase-1
# updates with --fp16, then wd-materialize, on a generated toy corpus. Fails unless each
# run made all its updates with finite losses and really trained in that precision.
#
#   bash examples/fp16_smoke.sh [WORK_DIR]     (default: a new directory under $TMPDIR)
#
# Settings (environment): FP16_SMOKE_PRECISION=fp16 (default) | amp picks the fairseq
# flag (--fp16, --amp); FP16_SMOKE_TEACHER_UPDATES (default 40) and
# FP16_SMOKE_PHASE1_UPDATES (default 10) the update counts. (fairseq 0.12's --bf16 sets
# --tpu: it trains on TPUs only, so it has no GPU smoke test.)
#
# Needs the environment of examples/setup_env.sh (fairseq-train and wd-materialize on
# PATH) and a CUDA GPU (about a minute). Without a GPU it says so and exits with status 2
# before doing anything. Exit status 3: every check passed, but a training process
# aborted at exit after saving its checkpoint (seen with --fp16 on torch 2.11 + CUDA 13). FP16_SMOKE_CPU=1 runs the same commands in fp32 on CPU: that
# checks the script itself, not fp16.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PYTHON=${PYTHON:-python}
TEACHER_UPDATES=${FP16_SMOKE_TEACHER_UPDATES:-40}
PHASE1_UPDATES=${FP16_SMOKE_PHASE1_UPDATES:-10}

if [ "${FP16_SMOKE_CPU:-0}" = 1 ]; then
  PRECISION=fp32
  FLAGS=(--cpu)
else
  PRECISION=${FP16_SMOKE_PRECISION:-fp16}
  case "$PRECISION" in
    fp16 | amp) FLAGS=("--$PRECISION") ;;
    bf16)
      echo "fp16_smoke.sh: FP16_SMOKE_PRECISION=bf16: fairseq 0.12's --bf16 sets --tpu and" \
        "trains on TPUs only (on a GPU its Trainer fails in get_tpu_device). Fix: use fp16" \
        "or amp" >&2
      exit 1
      ;;
    *)
      echo "fp16_smoke.sh: FP16_SMOKE_PRECISION=$PRECISION is not one of fp16, amp." \
        "Fix: set it to one of those (or unset it for fp16)" >&2
      exit 1
      ;;
  esac
  if ! device=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "none")' 2>/dev/null | tail -n 1); then
    echo "fp16_smoke.sh: '$PYTHON' cannot import torch. Fix: source examples/setup_env.sh first" >&2
    exit 1
  fi
  if [ "$device" != cuda ]; then
    echo "fp16_smoke.sh: no CUDA GPU is visible to torch (torch.cuda.is_available() is False," \
      "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}). This smoke test checks --fp16" \
      "training, which needs a GPU: run it on a GPU machine. Nothing was run." >&2
    exit 2
  fi
fi

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/wd-fp16-smoke.XXXXXX")}
mkdir -p "$WORK"
echo "[fp16-smoke] work directory: $WORK"

ABORTED_AT_EXIT=()
run() {  # run STAGE COMMAND...: output to $WORK/STAGE.log, its tail on failure
  local stage=$1 status=0
  shift
  echo "[fp16-smoke] $stage"
  "$@" > "$WORK/$stage.log" 2>&1 || status=$?
  [ "$status" = 0 ] && return 0
  # A training run that aborted (SIGABRT) only after fairseq-train reported it had
  # finished: its checkpoint is saved. Noted, the later stages still run, and the
  # script fails at the end (status 3).
  if [ "$status" = 134 ] && grep -q "fairseq_cli.train | done training in" "$WORK/$stage.log"; then
    echo "[fp16-smoke] WARNING: $stage aborted at process exit, after it finished" \
      "training and saved its checkpoint ($(grep -m1 -o 'terminate called.*' \
      "$WORK/$stage.log" || echo SIGABRT)); log: $WORK/$stage.log" >&2
    ABORTED_AT_EXIT+=("$stage")
    return 0
  fi
  tail -n 40 "$WORK/$stage.log" >&2
  echo "fp16_smoke.sh: stage '$stage' failed; full log: $WORK/$stage.log" >&2
  exit 1
}

COMMON=(
  --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt
  --warmup-updates 10 --criterion label_smoothed_cross_entropy --label-smoothing 0.1
  --max-tokens 4096 --seed 1 --no-progress-bar --log-format json --log-interval 1
  --disable-validation --no-epoch-checkpoints --num-workers 0 --data-buffer-size 0
  "${FLAGS[@]}"
)

run corpus "$PYTHON" "$HERE/fp16_smoke_tools.py" corpus "$WORK/raw"
run preprocess fairseq-preprocess --source-lang src --target-lang tgt \
  --trainpref "$WORK/raw/train" --validpref "$WORK/raw/valid" \
  --destdir "$WORK/data-bin" --workers 1
run teacher fairseq-train "$WORK/data-bin" --arch transformer \
  --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 --decoder-embed-dim 64 \
  --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 \
  --encoder-attention-heads 4 --decoder-attention-heads 4 \
  "${COMMON[@]}" --max-update "$TEACHER_UPDATES" --save-dir "$WORK/teacher"
"$PYTHON" "$HERE/fp16_smoke_tools.py" check-log "$WORK/teacher.log" \
  --updates "$TEACHER_UPDATES" --precision "$PRECISION"
run phase1 fairseq-train "$WORK/data-bin" --user-dir "$REPO/wd_fairseq" \
  --arch wd_transformer --teacher-path "$WORK/teacher/checkpoint_last.pt" \
  --decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 \
  --decoder-attention-heads 4 \
  "${COMMON[@]}" --max-update "$PHASE1_UPDATES" --save-dir "$WORK/phase1"
"$PYTHON" "$HERE/fp16_smoke_tools.py" check-log "$WORK/phase1.log" \
  --updates "$PHASE1_UPDATES" --precision "$PRECISION"
run materialize wd-materialize "$WORK/phase1/checkpoint_last.pt" "$WORK/student.pt"
if [ ${#ABORTED_AT_EXIT[@]} -gt 0 ]; then
  echo "fp16_smoke.sh: $PRECISION teacher and WD phase 1 trained with finite losses, but" \
    "these processes aborted at exit: ${ABORTED_AT_EXIT[*]}" >&2
  exit 3
fi
echo "[fp16-smoke] passed: $PRECISION teacher and WD phase 1 trained with finite losses;" \
  "student: $WORK/student.pt"
