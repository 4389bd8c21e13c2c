#!/usr/bin/env bash
# The Weight Distillation pipeline (docs/method.md section 1) for one language pair.
#
#   pipeline.sh [STAGE ...]        run the given stages (default: all, in order)
#   pipeline.sh plan               print the review (GPUs, batch, disk, differences from the
#                                  authors) and every command of every stage; run nothing
#   pipeline.sh config             print the resolved settings and the review
#
# Stages, in order:
#   prepare     raw text (download or RAW_DIR) -> Moses tokens -> BPE -> fairseq-preprocess
#   teacher     train the teacher, average its last AVG_LAST epoch checkpoints
#   kd_data     decode the training source with the teacher (wd-kd-data) -> split train1
#               of $WORK/data-bin-kd (links to data-bin + train1; data-bin stays original)
#   kd_student  KD baseline: the student's shape, from scratch, on original + KD data
#   wd_phase1   WD phase 1 (--arch wd_transformer) on original + KD data
#   materialize wd-materialize the phase-1 generators into a stock student
#   wd_phase2   fine-tune that student (fresh optimizer), average the last checkpoints
#   evaluate    fairseq-generate every model on every test set; sacreBLEU (+signature),
#               chrF, tokenized BLEU -> $WORK/results.{json,md}
#   speed       decoding speed of every model (SPEED_BATCH_SIZE) relative to the teacher
# Optional, by name only (e.g. pipeline.sh sel_student; EVAL_MODELS=sel_student evaluate):
#   sel_student Selection + KD, the cheap weight-transfer baseline: the KD student's training
#               started from a student selected from the teacher (wd-init-student)
# This script resolves and checks the settings; recipe_stages.py (prepare: recipe_prepare.py)
# builds and runs the stages on wd-distill's machinery (wd_fairseq/stages.py, commands.py).
# A finished stage leaves $WORK/done/STAGE and is skipped when run again (FORCE=1 redoes
# the stages named on the command line). Training stages interrupted halfway resume from
# their checkpoint_last.pt; every stage logs to $WORK/logs/STAGE.log.
#
# Settings (environment variables; each pair's run.sh sets its own defaults):
#   SRC, TGT            language codes (required)           WORK   work directory (required)
#   PAIR_NAME           title of the results table
#   Data, either local text or downloads:
#   RAW_DIR             directory with raw (untokenized) parallel text: train.$SRC train.$TGT,
#                       $VALID_SET.$SRC $VALID_SET.$TGT and, for each test set NAME,
#                       NAME.$SRC plus NAME.$TGT or NAME.${TGT}0 NAME.${TGT}1 ... (several
#                       references). When set, nothing is downloaded.
#   TRAIN_URLS          space-separated archive URLs (.tgz/.tar.gz/.zip/.gz) of training data
#   TRAIN_PREFIXES      space-separated paths inside the extracted archives; each has
#                       PREFIX.$SRC and PREFIX.$TGT, concatenated into train.*
#   CHECKSUMS           file of "SHA256  FILENAME" lines checked after each download; a file
#                       without an entry is reported and its sum written to
#                       $WORK/downloads/SHA256SUMS.recorded
#   SACREBLEU_VALID, SACREBLEU_TEST   sacreBLEU test-set names (sacrebleu -t) of the valid
#                       and test sets (downloaded and checksummed by sacrebleu)
#   VALID_SET (valid), TEST_SETS (test)   names of the valid set and test sets
#   Text processing:
#   TOKENIZE_SRC, TOKENIZE_TGT   moses (normalise punctuation + Moses tokenization with
#                       aggressive dash splitting, via sacremoses) or none (input already
#                       segmented, e.g. word-segmented Chinese: only whitespace is collapsed).
#                       Lines end at \n only; \r, \x85, \u2028, form feeds become spaces.
#   RO_DIACRITICS (keep)  Romanian text: ş ţ -> ș ț always; remove: also ă â î ș ț -> a a i s t
#   BPE_MERGES (32000)  subword-nmt merges       JOINT_BPE (1)  one BPE for both languages
#   BPE_VOCAB_THRESHOLD (50)  subword-nmt apply-bpe --vocabulary-threshold
#   JOINED_DICT (0)     fairseq-preprocess --joined-dictionary
#   CLEAN_MAX_LEN (250), CLEAN_RATIO (1.5)   training pair filter (Moses clean-corpus-n)
#   Models (the authors': teacher 6/512/2048/8; stu1 decoder 1/256/1024/8, stu2 2/512/2048/8):
#   TEACHER_LAYERS TEACHER_DIM TEACHER_FFN TEACHER_HEADS   teacher (encoder and decoder)
#   STUDENT_DEC_LAYERS STUDENT_DEC_DIM STUDENT_DEC_FFN STUDENT_DEC_HEADS   students' decoder
#                       (their encoder is the teacher's shape, as in the paper)
#   WD_INIT (faithful)  --wd-init of phase 1 (faithful or slice)
#   Training (authors: 8 GPUs x 4096 tokens, Adam (0.9,0.98), lr 7e-4, inverse_sqrt,
#   warmup 4000 / phase 2 1000, label smoothing 0.1, dropout 0.1, no clipping, seed 1, fp16):
#   NUM_GPUS            training processes (default: the GPUs nvidia-smi -L lists, filtered
#                       by CUDA_VISIBLE_DEVICES; 1 without GPUs or with CPU=1). Passed to
#                       fairseq as --distributed-world-size; more than the visible GPUs is
#                       refused. NUM_GPUS > 1 launches torchrun (one wd-train per GPU; with
#                       CPU=1, per gloo process)
#   MAX_TOKENS (4096)   BATCH_TOKENS (32768: the authors' 8 GPUs x 4096)
#   UPDATE_FREQ         default BATCH_TOKENS/(NUM_GPUS*MAX_TOKENS) (e.g. 2 GPUs -> 4). A
#                       product NUM_GPUS x MAX_TOKENS x UPDATE_FREQ other than BATCH_TOKENS
#                       (3, 5, 6, 7 GPUs) is refused unless ALLOW_BATCH_MISMATCH=1
#   LR (7e-4) WARMUP (4000) PHASE2_WARMUP (1000) SEED (1) LABEL_SMOOTHING (0.1)
#   PHASE2_SCHEDULE (restart)  restart: phase 2 warms up again (PHASE2_WARMUP), the authors';
#                       continue: phase 2 goes on along phase 1's inverse_sqrt curve from update
#                       PHASE1_UPDATES (--lr-scheduler inverse_sqrt_offset), as one run of
#                       PHASE1_UPDATES + PHASE2_UPDATES would: the KD students' curve
#   DROPOUT ATTENTION_DROPOUT ACTIVATION_DROPOUT (0.1 each, every training stage)
#   TEACHER_UPDATES (100000) KD_UPDATES (30000) PHASE1_UPDATES (30000) PHASE2_UPDATES (30000)
#   SAVE_INTERVAL_UPDATES (1000) AVG_LAST (5) PHASE2_AVG_LAST (AVG_LAST: phase 2's own count)
#   TEACHER_AVERAGE (epochs) STUDENT_AVERAGE (updates)   what the teacher and the KD student
#                       and phase 2 average: their last AVG_LAST epoch checkpoints (epochs,
#                       the authors' teacher) or last AVG_LAST saves, SAVE_INTERVAL_UPDATES
#                       apart (updates: the stage's update count must be a multiple of
#                       SAVE_INTERVAL_UPDATES, checked before any stage). fairseq keeps only
#                       the checkpoints the rule needs (phase 1: its last save)
#   FP16 (1)            --fp16 for training and decoding      CPU (0)  --cpu everywhere
#   KD_ALPHA (0) KD_TEMPERATURE (1)   word-level KD (kd_label_smoothed_cross_entropy) in the
#                       KD student and phase 1; 0 = the authors' label-smoothed CE only
#   TRAIN_EXTRA         extra fairseq-train flags for every training stage
#   WORKERS             CPU processes for tokenization and fairseq-preprocess (default: nproc)
#   Decoding:
#   KD_BEAM (6) KD_LENPEN (1.0) KD_MAX_TOKENS (4096)   KD data (docs/method.md section 1)
#   KD_ENGINE           wd-kd-data --engine: ctranslate2 or fairseq (default: wd-kd-data's,
#                       CTranslate2 where the teacher converts)
#   KD_EXTRA            extra wd-kd-data flags (e.g. --quantization float32, or the optional
#                       filters --filter-length-ratio R --filter-min-score S)
#   SEL_LAYERS (spread) SEL_DIMS (first)   sel_student: wd-init-student --layers/--dims
#   SEL_INIT (selection)  sel_student's start: selection (the teacher's layers and dimensions
#                       picked by SEL_LAYERS/SEL_DIMS), or wd-slice / wd-faithful: WD phase 1's
#                       start (its generators at step 0, seed SEED) materialised, trained with
#                       KD and no generator (the study's control)
#   BEAM (6) LENPEN (1.0) EVAL_BATCH_SIZE (128)         evaluation
#   EVAL_MODELS         the models evaluate and speed score (default: all, "teacher kd_student
#                       wd_phase1 wd_student"); e.g. kd_student alone for a KD-data variant
#   EXTRA_MODELS        more models for EVAL_MODELS to name: "NAME=CHECKPOINT ..." (e.g. an
#                       intermediate checkpoint, kd_1600=/path/checkpoint_avg_1600.pt); names of
#                       letters, digits, _ . -; no spaces in the paths
#   BLEU_CONVENTION     tokenized BLEU: moses, moses-lc (NIST) or ende-compound (WMT14 En-De)
#   SPEED_BATCH_SIZE (1)  sentences per batch in the speed stage (first test set)
#   SPEED_ROUNDS (3)    timing runs of every model, interleaved; the table gives the median,
#                       one speed per architecture (students of one shape share it)
#   GENERATE_EXTRA      extra fairseq-generate flags for evaluate and speed (e.g. --max-len-b 50)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS=$HERE/recipe_tools.py
PYTHON=${PYTHON:-python}
# the stages after prepare import the plugin as installed in this environment
"$PYTHON" -I -c 'import importlib.util as u, sys; sys.exit(u.find_spec("wd_fairseq") is None)' 2>/dev/null \
  || { echo "pipeline.sh: error: wd_fairseq is not installed for PYTHON=$PYTHON. Fix: source examples/setup_env.sh (or pip install the repository)" >&2; exit 1; }

: "${SRC:?set SRC (source language code)}" "${TGT:?set TGT (target language code)}"
: "${WORK:?set WORK (work directory)}"
PAIR_NAME=${PAIR_NAME:-$SRC-$TGT}
RAW_DIR=${RAW_DIR:-}
TRAIN_URLS=${TRAIN_URLS:-}
TRAIN_PREFIXES=${TRAIN_PREFIXES:-}
CHECKSUMS=${CHECKSUMS:-}
SACREBLEU_VALID=${SACREBLEU_VALID:-}
SACREBLEU_TEST=${SACREBLEU_TEST:-}
VALID_SET=${VALID_SET:-valid}
TEST_SETS=${TEST_SETS:-test}
TOKENIZE_SRC=${TOKENIZE_SRC:-moses}
TOKENIZE_TGT=${TOKENIZE_TGT:-moses}
RO_DIACRITICS=${RO_DIACRITICS:-keep}
BPE_MERGES=${BPE_MERGES:-32000}
JOINT_BPE=${JOINT_BPE:-1}
BPE_VOCAB_THRESHOLD=${BPE_VOCAB_THRESHOLD:-50}
JOINED_DICT=${JOINED_DICT:-0}
CLEAN_MAX_LEN=${CLEAN_MAX_LEN:-250}
CLEAN_RATIO=${CLEAN_RATIO:-1.5}
TEACHER_LAYERS=${TEACHER_LAYERS:-6}
TEACHER_DIM=${TEACHER_DIM:-512}
TEACHER_FFN=${TEACHER_FFN:-2048}
TEACHER_HEADS=${TEACHER_HEADS:-8}
STUDENT_DEC_LAYERS=${STUDENT_DEC_LAYERS:-1}
STUDENT_DEC_DIM=${STUDENT_DEC_DIM:-256}
STUDENT_DEC_FFN=${STUDENT_DEC_FFN:-1024}
STUDENT_DEC_HEADS=${STUDENT_DEC_HEADS:-8}
WD_INIT=${WD_INIT:-faithful}
FP16=${FP16:-1}
CPU=${CPU:-0}
MAX_TOKENS=${MAX_TOKENS:-4096}
BATCH_TOKENS=${BATCH_TOKENS:-32768}
ALLOW_BATCH_MISMATCH=${ALLOW_BATCH_MISMATCH:-0}
# GPUs fairseq would see (nvidia-smi -L, filtered by CUDA_VISIBLE_DEVICES), the number of
# training processes and the update frequency: see recipe_tools.py batch.
VISIBLE_GPUS=$("$PYTHON" "$TOOLS" gpus) || exit 1
BATCH=$("$PYTHON" "$TOOLS" batch --visible "$VISIBLE_GPUS" --cpu "$CPU" --num-gpus "${NUM_GPUS:-}" \
  --max-tokens "$MAX_TOKENS" --update-freq "${UPDATE_FREQ:-}" --batch-tokens "$BATCH_TOKENS" \
  --allow-mismatch "$ALLOW_BATCH_MISMATCH") || exit 1
read -r NUM_GPUS UPDATE_FREQ EFFECTIVE_TOKENS <<< "$BATCH"
LR=${LR:-7e-4}
WARMUP=${WARMUP:-4000}
PHASE2_WARMUP=${PHASE2_WARMUP:-1000}
PHASE2_SCHEDULE=${PHASE2_SCHEDULE:-restart}
DROPOUT=${DROPOUT:-0.1}
ATTENTION_DROPOUT=${ATTENTION_DROPOUT:-0.1}
ACTIVATION_DROPOUT=${ACTIVATION_DROPOUT:-0.1}
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}
SEED=${SEED:-1}
TEACHER_UPDATES=${TEACHER_UPDATES:-100000}
KD_UPDATES=${KD_UPDATES:-30000}
PHASE1_UPDATES=${PHASE1_UPDATES:-30000}
PHASE2_UPDATES=${PHASE2_UPDATES:-30000}
SAVE_INTERVAL_UPDATES=${SAVE_INTERVAL_UPDATES:-1000}
AVG_LAST=${AVG_LAST:-5}
PHASE2_AVG_LAST=${PHASE2_AVG_LAST:-$AVG_LAST}
TEACHER_AVERAGE=${TEACHER_AVERAGE:-epochs}
STUDENT_AVERAGE=${STUDENT_AVERAGE:-updates}
KD_ALPHA=${KD_ALPHA:-0}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
WORKERS=${WORKERS:-$(nproc)}
KD_BEAM=${KD_BEAM:-6}
KD_LENPEN=${KD_LENPEN:-1.0}
KD_MAX_TOKENS=${KD_MAX_TOKENS:-4096}
KD_ENGINE=${KD_ENGINE:-}
BEAM=${BEAM:-6}
LENPEN=${LENPEN:-1.0}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}
EVAL_MODELS=${EVAL_MODELS:-teacher kd_student wd_phase1 wd_student}
EXTRA_MODELS=${EXTRA_MODELS:-}
SEL_LAYERS=${SEL_LAYERS:-spread}
SEL_DIMS=${SEL_DIMS:-first}
SEL_INIT=${SEL_INIT:-selection}
BLEU_CONVENTION=${BLEU_CONVENTION:-moses}
SPEED_BATCH_SIZE=${SPEED_BATCH_SIZE:-1}
SPEED_ROUNDS=${SPEED_ROUNDS:-3}
GENERATE_EXTRA=${GENERATE_EXTRA:-}
KD_EXTRA=${KD_EXTRA:-}
FORCE=${FORCE:-0}

# the stages, run by recipe_stages.py (sel_student: by name only)
STAGES=(prepare teacher kd_data kd_student wd_phase1 materialize wd_phase2 evaluate speed)
DATA=$WORK/data-bin
# the models evaluate and speed can score (wd_phase1: materialised, before phase 2)
MODEL_NAMES=(teacher kd_student wd_phase1 wd_student sel_student)
for _model in $EXTRA_MODELS; do
  [[ "$_model" =~ ^([A-Za-z0-9_.-]+)=(.+)$ ]] \
    || { echo "pipeline.sh: error: EXTRA_MODELS: '$_model' is not NAME=CHECKPOINT. Fix: e.g. EXTRA_MODELS=\"kd_1600=/path/to/checkpoint.pt\" (name: letters, digits, _ . -)" >&2; exit 1; }
  [[ " ${MODEL_NAMES[*]} " != *" ${BASH_REMATCH[1]} "* ]] \
    || { echo "pipeline.sh: error: EXTRA_MODELS: the name '${BASH_REMATCH[1]}' is taken. Fix: name it otherwise" >&2; exit 1; }
  MODEL_NAMES+=("${BASH_REMATCH[1]}")
done
# no tqdm bars (subword-nmt's) in logs and consoles; progress comes as log lines
export TQDM_DISABLE=${TQDM_DISABLE:-1}

die() { echo "pipeline.sh: error: $*" >&2; exit 1; }
[[ "$PHASE2_SCHEDULE" =~ ^(restart|continue)$ ]] \
  || die "PHASE2_SCHEDULE=$PHASE2_SCHEDULE: choose restart (the authors') or continue. Fix: e.g. PHASE2_SCHEDULE=continue"
[[ "$SPEED_ROUNDS" =~ ^[1-9][0-9]*$ ]] \
  || die "SPEED_ROUNDS=$SPEED_ROUNDS is not a positive integer. Fix: e.g. SPEED_ROUNDS=3"
flag_if() { [ "$1" = 1 ] && echo "$2" || true; }

# -- driver -------------------------------------------------------------------------

SETTINGS=(SRC TGT WORK PAIR_NAME RAW_DIR TRAIN_URLS TRAIN_PREFIXES CHECKSUMS SACREBLEU_VALID
  SACREBLEU_TEST VALID_SET TEST_SETS TOKENIZE_SRC TOKENIZE_TGT RO_DIACRITICS BPE_MERGES JOINT_BPE
  BPE_VOCAB_THRESHOLD JOINED_DICT CLEAN_MAX_LEN CLEAN_RATIO TEACHER_LAYERS TEACHER_DIM
  TEACHER_FFN TEACHER_HEADS STUDENT_DEC_LAYERS STUDENT_DEC_DIM STUDENT_DEC_FFN
  STUDENT_DEC_HEADS WD_INIT VISIBLE_GPUS NUM_GPUS MAX_TOKENS UPDATE_FREQ BATCH_TOKENS
  EFFECTIVE_TOKENS ALLOW_BATCH_MISMATCH LR WARMUP PHASE2_WARMUP PHASE2_SCHEDULE DROPOUT ATTENTION_DROPOUT
  ACTIVATION_DROPOUT LABEL_SMOOTHING SEED TEACHER_UPDATES KD_UPDATES PHASE1_UPDATES
  PHASE2_UPDATES SAVE_INTERVAL_UPDATES AVG_LAST PHASE2_AVG_LAST TEACHER_AVERAGE STUDENT_AVERAGE FP16 CPU
  KD_ALPHA KD_TEMPERATURE TRAIN_EXTRA WORKERS KD_BEAM KD_LENPEN KD_MAX_TOKENS KD_ENGINE KD_EXTRA SEL_LAYERS SEL_DIMS SEL_INIT BEAM LENPEN
  EVAL_BATCH_SIZE EVAL_MODELS EXTRA_MODELS BLEU_CONVENTION SPEED_BATCH_SIZE SPEED_ROUNDS GENERATE_EXTRA)

settings() {
  local v
  for v in "${SETTINGS[@]}"; do printf '%s=%s\n' "$v" "${!v}"; done
}

# config: the settings, then the review (GPUs, batch, disk, differences from the authors).
show_config() {
  settings
  echo
  settings | "$PYTHON" "$TOOLS" review --data "$DATA"
}

# recipe_stages.py plan|run ..., given the settings.
recipe_stages() { settings | "$PYTHON" "$HERE/recipe_stages.py" "$@"; }

# plan: the review, then every command of every stage with its resolved flags.
show_plan() {
  settings | "$PYTHON" "$TOOLS" review --data "$DATA"
  recipe_stages plan
}

# The settings that would fail only after hours of work, checked before any stage.
check_settings() {
  local v
  for v in $EVAL_MODELS; do
    [[ " ${MODEL_NAMES[*]} " == *" $v "* ]] || die "EVAL_MODELS: unknown model '$v'. Fix: choose from ${MODEL_NAMES[*]}"
  done
  for v in TEACHER_AVERAGE STUDENT_AVERAGE; do
    case "${!v}" in epochs|updates) ;; *) die "$v=${!v}: unknown averaging rule. Fix: set $v=epochs or $v=updates" ;; esac
  done
  case "$RO_DIACRITICS" in keep|remove) ;; *) die "RO_DIACRITICS=$RO_DIACRITICS: use keep or remove" ;; esac
  case "$SEL_INIT" in selection|wd-slice|wd-faithful) ;; *) die "SEL_INIT=$SEL_INIT: use selection, wd-slice or wd-faithful" ;; esac
  # the stages that average their last saves need a save at their final update
  for v in TEACHER_UPDATES KD_UPDATES PHASE2_UPDATES; do
    if [ "$v" = TEACHER_UPDATES ] && [ "$TEACHER_AVERAGE" = epochs ]; then continue; fi
    if [ "$v" != TEACHER_UPDATES ] && [ "$STUDENT_AVERAGE" = epochs ]; then continue; fi
    [ $(( ${!v} % SAVE_INTERVAL_UPDATES )) = 0 ] || die "$v=${!v} is not a multiple of \
SAVE_INTERVAL_UPDATES=$SAVE_INTERVAL_UPDATES, so the stage's last updates would be left out \
of the checkpoint average. Fix: make $v a multiple of SAVE_INTERVAL_UPDATES (or change the interval)"
    local last=$AVG_LAST name=AVG_LAST
    [ "$v" = PHASE2_UPDATES ] && last=$PHASE2_AVG_LAST name=PHASE2_AVG_LAST
    [ $(( ${!v} / SAVE_INTERVAL_UPDATES )) -ge "$last" ] || die "$v=${!v} gives \
$(( ${!v} / SAVE_INTERVAL_UPDATES )) saves (SAVE_INTERVAL_UPDATES=$SAVE_INTERVAL_UPDATES), fewer \
than the $last the stage averages ($name). Fix: train longer, save more often, or lower $name"
  done
}

main() {
  check_settings
  case "${1:-}" in
    config) show_config; return ;;
    plan) show_plan; return ;;
  esac
  local stages=("$@") stage
  [ ${#stages[@]} -gt 0 ] || stages=("${STAGES[@]}")
  for stage in "${stages[@]}"; do
    [[ " ${STAGES[*]} sel_student " == *" $stage "* ]] || die "unknown stage '$stage'. Stages: ${STAGES[*]}; optional: sel_student (or config, plan)"
  done
  recipe_stages run $(flag_if "$FORCE" --force) "${stages[@]}"
}

# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
