#!/usr/bin/env bash
# The Weight Distillation pipeline (WD_SPEC section 1) for one language pair.
#
#   pipeline.sh [STAGE ...]        run the given stages (default: all, in order)
#   pipeline.sh config             print the resolved settings and exit
#
# Stages, in order:
#   prepare     raw text (download or RAW_DIR) -> Moses tokens -> BPE -> fairseq-preprocess
#   teacher     train the teacher, average its last AVG_LAST checkpoints
#   kd_data     decode the training source with the teacher (wd-kd-data) -> split train1
#               of $WORK/data-bin-kd (links to data-bin + train1; data-bin stays original)
#   kd_student  KD baseline: the student's shape, from scratch, on original + KD data
#   wd_phase1   WD phase 1 (--arch wd_transformer) on original + KD data
#   materialize wd-materialize the phase-1 generators into a stock student
#   wd_phase2   fine-tune that student (fresh optimizer), average the last checkpoints
#   evaluate    fairseq-generate every model on every test set; sacreBLEU (+signature),
#               chrF, tokenized BLEU -> $WORK/results.{json,md}
#   speed       decoding speed of every model (SPEED_BATCH_SIZE) relative to the teacher
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
#                       segmented, e.g. word-segmented Chinese: only whitespace is collapsed)
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
#   NUM_GPUS (visible GPUs, else 1)   MAX_TOKENS (4096)
#   UPDATE_FREQ         default 8*4096/(NUM_GPUS*MAX_TOKENS): the authors' 32k-token batch
#                       on fewer GPUs (e.g. 2 GPUs -> --update-freq 4)
#   LR (7e-4) WARMUP (4000) PHASE2_WARMUP (1000) DROPOUT (0.1) SEED (1)
#   TEACHER_UPDATES (100000) KD_UPDATES (30000) PHASE1_UPDATES (30000) PHASE2_UPDATES (30000)
#   SAVE_INTERVAL_UPDATES (1000) AVG_LAST (5)   the last AVG_LAST checkpoints (saved every
#                       SAVE_INTERVAL_UPDATES updates and at epoch ends) are averaged for the
#                       teacher, the KD student and phase 2, whose update counts must
#                       be multiples of SAVE_INTERVAL_UPDATES (checked before any stage)
#   FP16 (1)            --fp16 for training and decoding      CPU (0)  --cpu everywhere
#   KD_ALPHA (0) KD_TEMPERATURE (1)   word-level KD (kd_label_smoothed_cross_entropy) in the
#                       KD student and phase 1; 0 = the authors' label-smoothed CE only
#   TRAIN_EXTRA         extra fairseq-train flags for every training stage
#   WORKERS             CPU processes for tokenization and fairseq-preprocess (default: nproc)
#   Decoding:
#   KD_BEAM (6) KD_LENPEN (1.0) KD_MAX_TOKENS (4096)   KD data (WD_SPEC section 1)
#   BEAM (6) LENPEN (1.0) EVAL_BATCH_SIZE (128)         evaluation
#   BLEU_CONVENTION     tokenized BLEU: moses, moses-lc (NIST) or ende-compound (WMT14 En-De)
#   SPEED_BATCH_SIZE (1)  sentences per batch in the speed stage (first test set)
#   GENERATE_EXTRA      extra fairseq-generate flags for evaluate and speed (e.g. --max-len-b 50)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TOOLS="$HERE/recipe_tools.py"
PYTHON=${PYTHON:-python}

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
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NUM_GPUS" -ge 1 ] 2>/dev/null || NUM_GPUS=1
fi
MAX_TOKENS=${MAX_TOKENS:-4096}
UPDATE_FREQ=${UPDATE_FREQ:-$(( (8 * 4096 + NUM_GPUS * MAX_TOKENS - 1) / (NUM_GPUS * MAX_TOKENS) ))}
LR=${LR:-7e-4}
WARMUP=${WARMUP:-4000}
PHASE2_WARMUP=${PHASE2_WARMUP:-1000}
DROPOUT=${DROPOUT:-0.1}
SEED=${SEED:-1}
TEACHER_UPDATES=${TEACHER_UPDATES:-100000}
KD_UPDATES=${KD_UPDATES:-30000}
PHASE1_UPDATES=${PHASE1_UPDATES:-30000}
PHASE2_UPDATES=${PHASE2_UPDATES:-30000}
SAVE_INTERVAL_UPDATES=${SAVE_INTERVAL_UPDATES:-1000}
AVG_LAST=${AVG_LAST:-5}
FP16=${FP16:-1}
CPU=${CPU:-0}
KD_ALPHA=${KD_ALPHA:-0}
KD_TEMPERATURE=${KD_TEMPERATURE:-1}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
WORKERS=${WORKERS:-$(nproc)}
KD_BEAM=${KD_BEAM:-6}
KD_LENPEN=${KD_LENPEN:-1.0}
KD_MAX_TOKENS=${KD_MAX_TOKENS:-4096}
BEAM=${BEAM:-6}
LENPEN=${LENPEN:-1.0}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}
BLEU_CONVENTION=${BLEU_CONVENTION:-moses}
SPEED_BATCH_SIZE=${SPEED_BATCH_SIZE:-1}
GENERATE_EXTRA=${GENERATE_EXTRA:-}
FORCE=${FORCE:-0}

STAGES=(prepare teacher kd_data kd_student wd_phase1 materialize wd_phase2 evaluate speed)
DATA=$WORK/data-bin
DATA_KD=$WORK/data-bin-kd
TEACHER=$WORK/teacher/checkpoint_avg.pt
KD_STUDENT=$WORK/kd_student/checkpoint_avg.pt
WD_INIT_CKPT=$WORK/wd_phase2/init.pt
WD_STUDENT=$WORK/wd_phase2/checkpoint_avg.pt
# name:checkpoint of every evaluated model (wd_phase1 = materialised, before phase 2)
MODELS="teacher:$TEACHER kd_student:$KD_STUDENT wd_phase1:$WD_INIT_CKPT wd_student:$WD_STUDENT"

log() { echo "[$(date '+%F %T')] [$PAIR_NAME] $*"; }
die() { echo "pipeline.sh: error: $*" >&2; exit 1; }
flag_if() { [ "$1" = 1 ] && echo "$2" || true; }
device_flags() { flag_if "$FP16" --fp16; flag_if "$CPU" --cpu; }

# -- prepare ------------------------------------------------------------------------

# Write "$1" from the stdout of the remaining command, atomically; skip if it exists.
produce() {
  local out=$1; shift
  [ -s "$out" ] && return 0
  "$@" > "$out.tmp"
  mv "$out.tmp" "$out"
}

check_sum() {
  local file=$1 name; name=$(basename "$1")
  local actual expected=""
  actual=$(sha256sum "$file" | cut -d' ' -f1)
  [ -n "$CHECKSUMS" ] && [ -f "$CHECKSUMS" ] && expected=$(awk -v n="$name" '$2 == n {print $1}' "$CHECKSUMS")
  if [ -z "$expected" ]; then
    log "WARNING: no checksum for $name in ${CHECKSUMS:-CHECKSUMS (unset)}; sha256 $actual recorded in $WORK/downloads/SHA256SUMS.recorded"
    echo "$actual  $name" >> "$WORK/downloads/SHA256SUMS.recorded"
  elif [ "$expected" != "$actual" ]; then
    die "$file: sha256 $actual, expected $expected (from $CHECKSUMS). Fix: delete the file and rerun (a broken download), or correct $CHECKSUMS"
  fi
}

download_train() {
  local dl=$WORK/downloads url name
  mkdir -p "$dl/extracted"
  for url in $TRAIN_URLS; do
    name=$(basename "${url%%\?*}")
    if [ ! -s "$dl/$name" ]; then
      log "downloading $url"
      curl -fL --retry 3 -o "$dl/$name.part" "$url" || die "download of $url failed. Fix: check the network or the URL, then rerun"
      mv "$dl/$name.part" "$dl/$name"
    fi
    check_sum "$dl/$name"
    if [ ! -e "$dl/extracted/.$name.done" ]; then
      case "$name" in
        *.tgz|*.tar.gz) tar -xzf "$dl/$name" -C "$dl/extracted" ;;
        *.zip) "$PYTHON" -m zipfile -e "$dl/$name" "$dl/extracted" ;;
        *.gz) gunzip -c "$dl/$name" > "$dl/extracted/${name%.gz}" ;;
        *) die "$name: unknown archive type. Fix: use .tgz, .tar.gz, .zip or .gz URLs" ;;
      esac
      touch "$dl/extracted/.$name.done"
    fi
  done
  local prefix side
  : > "$WORK/raw/train.$SRC.tmp"; : > "$WORK/raw/train.$TGT.tmp"
  for prefix in $TRAIN_PREFIXES; do
    for side in "$SRC" "$TGT"; do
      [ -f "$dl/extracted/$prefix.$side" ] || die "$dl/extracted/$prefix.$side: not in the downloads. Fix: correct TRAIN_PREFIXES"
    done
    [ "$(wc -l < "$dl/extracted/$prefix.$SRC")" = "$(wc -l < "$dl/extracted/$prefix.$TGT")" ] \
      || die "$dl/extracted/$prefix.{$SRC,$TGT}: different line counts"
    cat "$dl/extracted/$prefix.$SRC" >> "$WORK/raw/train.$SRC.tmp"
    cat "$dl/extracted/$prefix.$TGT" >> "$WORK/raw/train.$TGT.tmp"
  done
  mv "$WORK/raw/train.$SRC.tmp" "$WORK/raw/train.$SRC"
  mv "$WORK/raw/train.$TGT.tmp" "$WORK/raw/train.$TGT"
}

raw_text() {
  mkdir -p "$WORK/raw"
  if [ -n "$RAW_DIR" ]; then
    local f
    for f in "$RAW_DIR"/*; do ln -sfn "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$WORK/raw/"; done
    return
  fi
  [ -n "$TRAIN_URLS" ] || die "no data: set RAW_DIR (local raw text) or TRAIN_URLS/TRAIN_PREFIXES"
  [ -s "$WORK/raw/train.$TGT" ] || download_train
  local sets="$VALID_SET:$SACREBLEU_VALID" test
  set -- $TEST_SETS
  [ $# = 1 ] || die "downloads give one test set (SACREBLEU_TEST); set RAW_DIR for several"
  sets="$sets $1:$SACREBLEU_TEST"
  for test in $sets; do
    produce "$WORK/raw/${test%%:*}.$SRC" sacrebleu -t "${test#*:}" -l "$SRC-$TGT" --echo src
    produce "$WORK/raw/${test%%:*}.$TGT" sacrebleu -t "${test#*:}" -l "$SRC-$TGT" --echo ref
  done
}

# Reference files of test set $1 (one, or several numbered ones).
references() {
  if [ -f "$WORK/raw/$1.$TGT" ]; then echo "$WORK/raw/$1.$TGT"; return; fi
  ls "$WORK/raw/$1.$TGT"[0-9]* 2>/dev/null || die "$WORK/raw/$1.$TGT (or $1.${TGT}0, ...): no reference. Fix: add it to RAW_DIR"
}

stage_prepare() {
  raw_text
  local tok=$WORK/tok bpe=$WORK/bpe set lang mode ref
  mkdir -p "$tok" "$bpe"
  for set in $TEST_SETS; do
    case "$set" in train*|valid*) die "test set name $set: fairseq would load it with train/valid splits. Fix: rename it" ;; esac
  done
  for set in train $VALID_SET $TEST_SETS; do
    for lang in "$SRC" "$TGT"; do
      if [ "$lang" = "$SRC" ]; then mode=$TOKENIZE_SRC; else mode=$TOKENIZE_TGT; fi
      ref=$WORK/raw/$set.$lang
      [ "$lang" = "$TGT" ] && [ ! -f "$ref" ] && ref=$(references "$set" | head -1)
      [ -f "$ref" ] || die "$ref: missing. Fix: provide $set.$lang (see RAW_DIR above)"
      [ -s "$tok/$set.$lang" ] || "$PYTHON" "$TOOLS" tokenize --lang "$lang" --mode "$mode" --workers "$WORKERS" "$ref" "$tok/$set.$lang"
    done
    [ "$(wc -l < "$tok/$set.$SRC")" = "$(wc -l < "$tok/$set.$TGT")" ] \
      || die "$set: $(wc -l < "$tok/$set.$SRC") source but $(wc -l < "$tok/$set.$TGT") target lines. Fix: the raw files of a set must be line-aligned"
  done
  [ -s "$tok/train.clean.$TGT" ] || "$PYTHON" "$TOOLS" clean --src "$tok/train.$SRC" --tgt "$tok/train.$TGT" \
    --out-prefix "$tok/train.clean" --src-lang "$SRC" --tgt-lang "$TGT" --max-len "$CLEAN_MAX_LEN" --ratio "$CLEAN_RATIO"
  if [ ! -s "$bpe/codes.$TGT" ]; then
    if [ "$JOINT_BPE" = 1 ]; then
      subword-nmt learn-joint-bpe-and-vocab --input "$tok/train.clean.$SRC" "$tok/train.clean.$TGT" -s "$BPE_MERGES" \
        -o "$bpe/codes.tmp" --write-vocabulary "$bpe/vocab.$SRC" "$bpe/vocab.$TGT"
      cp "$bpe/codes.tmp" "$bpe/codes.$SRC"; mv "$bpe/codes.tmp" "$bpe/codes.$TGT"
    else
      for lang in "$SRC" "$TGT"; do
        subword-nmt learn-bpe -s "$BPE_MERGES" < "$tok/train.clean.$lang" > "$bpe/codes.tmp"
        subword-nmt apply-bpe -c "$bpe/codes.tmp" < "$tok/train.clean.$lang" | subword-nmt get-vocab > "$bpe/vocab.$lang"
        mv "$bpe/codes.tmp" "$bpe/codes.$lang"
      done
    fi
  fi
  for set in train $VALID_SET $TEST_SETS; do
    for lang in "$SRC" "$TGT"; do
      local in=$tok/$set.$lang
      [ "$set" = train ] && in=$tok/train.clean.$lang
      produce "$bpe/$set.$lang" subword-nmt apply-bpe -c "$bpe/codes.$lang" --vocabulary "$bpe/vocab.$lang" \
        --vocabulary-threshold "$BPE_VOCAB_THRESHOLD" --input "$in"
    done
  done
  rm -rf "$DATA.tmp"
  fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --trainpref "$bpe/train" \
    --validpref "$bpe/$VALID_SET" --destdir "$DATA.tmp" --workers "$WORKERS" $(flag_if "$JOINED_DICT" --joined-dictionary)
  for set in $TEST_SETS; do
    # one fairseq-preprocess per test set: --testpref a,b would make test, test1 (concatenated)
    rm -rf "$WORK/tmp-$set"
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --testpref "$bpe/$set" --destdir "$WORK/tmp-$set" \
      --srcdict "$DATA.tmp/dict.$SRC.txt" --tgtdict "$DATA.tmp/dict.$TGT.txt" --workers "$WORKERS"
    for f in "$WORK/tmp-$set"/test.*; do mv "$f" "$DATA.tmp/$set.${f##*/test.}"; done
    rm -rf "$WORK/tmp-$set"
  done
  rm -rf "$DATA"; mv "$DATA.tmp" "$DATA"
}

# -- training -----------------------------------------------------------------------

common_train_flags() {
  echo --optimizer adam --adam-betas "(0.9,0.98)" --lr "$LR" --lr-scheduler inverse_sqrt \
    --warmup-init-lr 1e-7 --weight-decay 0.0 --clip-norm 0.0 --dropout "$DROPOUT" \
    --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --seed "$SEED" \
    --save-interval-updates "$SAVE_INTERVAL_UPDATES" --keep-interval-updates "$AVG_LAST" \
    --keep-last-epochs "$AVG_LAST" --no-progress-bar --log-format simple --log-interval 100 \
    --num-workers 1 --skip-invalid-size-inputs-valid-test $(device_flags) $TRAIN_EXTRA
}

teacher_shape() {
  local side
  for side in encoder decoder; do
    echo --$side-layers "$TEACHER_LAYERS" --$side-embed-dim "$TEACHER_DIM" \
      --$side-ffn-embed-dim "$TEACHER_FFN" --$side-attention-heads "$TEACHER_HEADS"
  done
}

student_decoder() {
  echo --decoder-layers "$STUDENT_DEC_LAYERS" --decoder-embed-dim "$STUDENT_DEC_DIM" \
    --decoder-ffn-embed-dim "$STUDENT_DEC_FFN" --decoder-attention-heads "$STUDENT_DEC_HEADS"
}

# $1: ls (label-smoothed CE), kd (word-level KD if KD_ALPHA != 0, teacher from --teacher-path)
# or wd (the same for phase 1, whose teacher is inside the model)
criterion_flags() {
  if [ "$1" != ls ] && [ "$KD_ALPHA" != 0 ]; then
    echo --criterion kd_label_smoothed_cross_entropy --label-smoothing 0.1 \
      --kd-alpha "$KD_ALPHA" --kd-temperature "$KD_TEMPERATURE"
    [ "$1" = wd ] || echo --user-dir "$REPO/wd_fairseq" --teacher-path "$TEACHER"
  else
    echo --criterion label_smoothed_cross_entropy --label-smoothing 0.1
  fi
}

# Average the last AVG_LAST checkpoints saved in directory $1 (every SAVE_INTERVAL_UPDATES
# updates, and at epoch ends: fairseq names a save that falls on an epoch end checkpointN.pt)
# into $1/checkpoint_avg.pt.
average_last() {
  local ckpts
  ckpts=$(ls -t "$1"/checkpoint_*_*.pt "$1"/checkpoint[0-9]*.pt 2>/dev/null | head -n "$AVG_LAST" || true)
  [ -n "$ckpts" ] || die "$1: no checkpoint to average. Fix: rerun the stage (it resumes)"
  "$PYTHON" "$TOOLS" average --out "$1/checkpoint_avg.pt" $ckpts
}

stage_teacher() {
  fairseq-train "$DATA" --arch transformer $(teacher_shape) $(common_train_flags) \
    $(criterion_flags ls) --warmup-updates "$WARMUP" --max-update "$TEACHER_UPDATES" \
    --save-dir "$WORK/teacher"
  average_last "$WORK/teacher"
}

stage_kd_data() {
  # data-bin-kd: links to every file of data-bin, plus train1 written by wd-kd-data.
  mkdir -p "$DATA_KD"
  local f
  for f in "$DATA"/*; do ln -sfn "$f" "$DATA_KD/"; done
  wd-kd-data "$DATA_KD" --teacher-path "$TEACHER" -s "$SRC" -t "$TGT" --beam "$KD_BEAM" \
    --lenpen "$KD_LENPEN" --max-tokens "$KD_MAX_TOKENS" $(device_flags)
}

# original + KD data: fairseq concatenates train and train1 (--upsample-primary 1 is
# needed: fairseq 0.12's default -1 breaks the concatenation)
student_train_flags() {
  echo --upsample-primary 1 $(common_train_flags)
}

stage_kd_student() {
  fairseq-train "$DATA_KD" --arch transformer $(teacher_shape) $(student_decoder) \
    $(student_train_flags) $(criterion_flags kd) --warmup-updates "$WARMUP" \
    --max-update "$KD_UPDATES" --save-dir "$WORK/kd_student"
  average_last "$WORK/kd_student"
}

stage_wd_phase1() {
  fairseq-train "$DATA_KD" --user-dir "$REPO/wd_fairseq" --arch wd_transformer \
    --teacher-path "$TEACHER" $(student_decoder) --wd-init "$WD_INIT" \
    $(student_train_flags) $(criterion_flags wd) --warmup-updates "$WARMUP" \
    --max-update "$PHASE1_UPDATES" --save-dir "$WORK/wd_phase1"
}

stage_materialize() {
  mkdir -p "$WORK/wd_phase2"
  wd-materialize "$WORK/wd_phase1/checkpoint_last.pt" "$WD_INIT_CKPT" --data "$DATA_KD"
  "$PYTHON" "$TOOLS" phase2-flags "$WD_INIT_CKPT" > "$WORK/wd_phase2/flags.tmp"
  mv "$WORK/wd_phase2/flags.tmp" "$WORK/wd_phase2/flags"
}

stage_wd_phase2() {
  fairseq-train "$DATA_KD" $(cat "$WORK/wd_phase2/flags") --finetune-from-model "$WD_INIT_CKPT" \
    $(student_train_flags) $(criterion_flags ls) --warmup-updates "$PHASE2_WARMUP" \
    --max-update "$PHASE2_UPDATES" --save-dir "$WORK/wd_phase2"
  average_last "$WORK/wd_phase2"
}

# -- evaluation ---------------------------------------------------------------------

# fairseq-generate of checkpoint $1 on test set $2, stdout and log into file $3; extra flags
# follow. --required-batch-size-multiple 1: with fairseq-fixed 0.12.3.1 any larger multiple
# silently drops the last, smaller batch (up to 7 test sentences).
generate() {
  local ckpt=$1 set=$2 out=$3; shift 3
  [ -f "$ckpt" ] || die "$ckpt: missing. Fix: run the stage that trains it first"
  fairseq-generate "$DATA" --path "$ckpt" --gen-subset "$set" -s "$SRC" -t "$TGT" \
    --beam "$BEAM" --lenpen "$LENPEN" --remove-bpe --required-batch-size-multiple 1 \
    --num-workers 1 $(device_flags) $GENERATE_EXTRA "$@" > "$out.tmp" 2>&1 \
    || { tail -n 20 "$out.tmp"; die "fairseq-generate of $ckpt on $set failed (log: $out.tmp)"; }
  mv "$out.tmp" "$out"
}

# The results table from the records made so far (rows in the order of MODELS).
results_table() {
  local records=() entry set kind
  for kind in eval speed; do
    for entry in $MODELS; do
      for set in $TEST_SETS; do
        [ -f "$WORK/$kind/${entry%%:*}.$set.json" ] && records+=("$WORK/$kind/${entry%%:*}.$set.json")
      done
    done
  done
  wd-evaluate table "${records[@]}" --teacher teacher --title "$PAIR_NAME" \
    --json "$WORK/results.json" --markdown "$WORK/results.md"
}

stage_evaluate() {
  mkdir -p "$WORK/eval"
  local entry name set refs
  for entry in $MODELS; do
    name=${entry%%:*}
    for set in $TEST_SETS; do
      refs=$(references "$set")
      generate "${entry#*:}" "$set" "$WORK/eval/$name.$set.gen" --batch-size "$EVAL_BATCH_SIZE"
      wd-evaluate score --generate-log "$WORK/eval/$name.$set.gen" --refs $refs \
        --lang "$TGT" --convention "$BLEU_CONVENTION" --name "$name" --test-set "$set" \
        --hypotheses-out "$WORK/eval/$name.$set.hyp" --out "$WORK/eval/$name.$set.json" > /dev/null
    done
  done
  results_table
}

stage_speed() {
  mkdir -p "$WORK/speed"
  local entry name set=${TEST_SETS%% *}
  for entry in $MODELS; do
    name=${entry%%:*}
    generate "${entry#*:}" "$set" "$WORK/speed/$name.$set.gen" --batch-size "$SPEED_BATCH_SIZE"
    wd-evaluate speed --generate-log "$WORK/speed/$name.$set.gen" --name "$name" --test-set "$set" \
      --out "$WORK/speed/$name.$set.json" > /dev/null
  done
  results_table
}

# -- driver -------------------------------------------------------------------------

show_config() {
  local v
  for v in SRC TGT WORK PAIR_NAME RAW_DIR TRAIN_URLS TRAIN_PREFIXES CHECKSUMS SACREBLEU_VALID \
    SACREBLEU_TEST VALID_SET TEST_SETS TOKENIZE_SRC TOKENIZE_TGT BPE_MERGES JOINT_BPE \
    BPE_VOCAB_THRESHOLD JOINED_DICT CLEAN_MAX_LEN CLEAN_RATIO TEACHER_LAYERS TEACHER_DIM \
    TEACHER_FFN TEACHER_HEADS STUDENT_DEC_LAYERS STUDENT_DEC_DIM STUDENT_DEC_FFN \
    STUDENT_DEC_HEADS WD_INIT NUM_GPUS MAX_TOKENS UPDATE_FREQ LR WARMUP PHASE2_WARMUP DROPOUT \
    SEED TEACHER_UPDATES KD_UPDATES PHASE1_UPDATES PHASE2_UPDATES SAVE_INTERVAL_UPDATES \
    AVG_LAST FP16 CPU KD_ALPHA KD_TEMPERATURE TRAIN_EXTRA WORKERS KD_BEAM KD_LENPEN \
    KD_MAX_TOKENS BEAM LENPEN EVAL_BATCH_SIZE BLEU_CONVENTION SPEED_BATCH_SIZE GENERATE_EXTRA; do
    printf '%s=%s\n' "$v" "${!v}"
  done
}

run_stage() {
  local stage=$1 rc
  if [ -e "$WORK/done/$stage" ] && [ "$FORCE" != 1 ]; then
    log "skip $stage (done; FORCE=1 $0 $stage redoes it)"
    return 0
  fi
  rm -f "$WORK/done/$stage"
  log "start $stage (log: $WORK/logs/$stage.log)"
  set +e
  ( set -e; "stage_$stage" ) 2>&1 | tee -a "$WORK/logs/$stage.log"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || die "stage $stage failed (exit $rc); see $WORK/logs/$stage.log. Rerun to resume"
  touch "$WORK/done/$stage"
  log "done $stage"
}

# The stages that average their last saves need a save at their final update.
check_update_counts() {
  local v
  for v in TEACHER_UPDATES KD_UPDATES PHASE2_UPDATES; do
    [ $(( ${!v} % SAVE_INTERVAL_UPDATES )) = 0 ] || die "$v=${!v} is not a multiple of \
SAVE_INTERVAL_UPDATES=$SAVE_INTERVAL_UPDATES, so the stage's last updates would be left out \
of the checkpoint average. Fix: make $v a multiple of SAVE_INTERVAL_UPDATES (or change the interval)"
  done
}

main() {
  if [ "${1:-}" = config ]; then show_config; return; fi
  local stages=("$@") stage
  [ ${#stages[@]} -gt 0 ] || stages=("${STAGES[@]}")
  check_update_counts
  for stage in "${stages[@]}"; do
    declare -F "stage_$stage" > /dev/null || die "unknown stage '$stage'. Stages: ${STAGES[*]} (or config)"
  done
  mkdir -p "$WORK/logs" "$WORK/done"
  for stage in "${stages[@]}"; do run_stage "$stage"; done
}

# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
