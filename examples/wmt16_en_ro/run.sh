#!/usr/bin/env bash
# WMT16 English->Romanian: the whole WD pipeline (../recipes/pipeline.sh documents every
# stage and setting; any of them can be overridden from the environment).
#
#   examples/wmt16_en_ro/run.sh                 # all stages, in $WORK (default ./wmt16_en_ro)
#   examples/wmt16_en_ro/run.sh teacher         # one stage (resumes when run again)
#   NUM_GPUS=2 examples/wmt16_en_ro/run.sh      # --update-freq 4 keeps 8 GPUs x 4096 tokens
#   examples/wmt16_en_ro/run.sh plan            # every command, the batch, disk, differences
#
# Data: Europarl v8 + SETimes2 (WMT16 training data, ~0.6M pairs), newsdev2016 (valid) and
# newstest2016 (test), both fetched by sacrebleu. Joint BPE, separate dictionaries.
# Romanian is normalised as in the standard WMT16 En-Ro setups, on the training text and on
# both sides of tokenized BLEU: ş ţ (cedilla) -> ș ț (comma below), Moses punctuation
# normalisation (so „” quotes match); RO_DIACRITICS=remove also strips ă â î ș ț (and
# reports tokenized BLEU in that convention, ro-nodiac).
# Checksums: downloads are checked against SHA256SUMS in this directory (none shipped yet).
# A first run prints "WARNING: no checksum for FILE" and appends each sum to
# $WORK/downloads/SHA256SUMS.recorded; once verified, copy that file here as SHA256SUMS (or
# point CHECKSUMS at it) and later runs stop on any mismatch (examples/recipes/README.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SRC=${SRC:-en} TGT=${TGT:-ro}
export PAIR_NAME=${PAIR_NAME:-"WMT16 En-Ro"}
export WORK=${WORK:-$PWD/wmt16_en_ro}
export TRAIN_URLS=${TRAIN_URLS:-"http://data.statmt.org/wmt16/translation-task/training-parallel-ep-v8.tgz https://object.pouta.csc.fi/OPUS-SETIMES/v2/moses/en-ro.txt.zip"}
export TRAIN_PREFIXES=${TRAIN_PREFIXES:-"training-parallel-ep-v8/europarl-v8.ro-en SETIMES.en-ro"}
export CHECKSUMS=${CHECKSUMS:-$HERE/SHA256SUMS}
export SACREBLEU_VALID=${SACREBLEU_VALID:-wmt16/dev} SACREBLEU_TEST=${SACREBLEU_TEST:-wmt16}
export BPE_MERGES=${BPE_MERGES:-40000} JOINT_BPE=${JOINT_BPE:-1}
export TEACHER_UPDATES=${TEACHER_UPDATES:-50000}
export RO_DIACRITICS=${RO_DIACRITICS:-keep}
if [ "$RO_DIACRITICS" = remove ]; then
  export BLEU_CONVENTION=${BLEU_CONVENTION:-ro-nodiac}
else
  export BLEU_CONVENTION=${BLEU_CONVENTION:-ro}
fi
exec bash "$HERE/../recipes/pipeline.sh" "$@"
