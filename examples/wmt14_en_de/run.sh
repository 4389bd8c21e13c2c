#!/usr/bin/env bash
# WMT14 English->German: the whole WD pipeline (../recipes/pipeline.sh documents every
# stage and setting; any of them can be overridden from the environment).
#
#   examples/wmt14_en_de/run.sh                 # all stages, in $WORK (default ./wmt14_en_de)
#   examples/wmt14_en_de/run.sh kd_data         # one stage (resumes when run again)
#   NUM_GPUS=4 examples/wmt14_en_de/run.sh      # --update-freq 2 keeps 8 GPUs x 4096 tokens
#   examples/wmt14_en_de/run.sh plan            # every command, the batch, disk, differences
#
# Data: Europarl v7 + Common Crawl + News Commentary v9 (~4.5M pairs), newstest2013 (valid)
# and newstest2014 "full" (test, 3003 sentences), both fetched by sacrebleu. Joint BPE with
# 32k merges. Tokenized BLEU follows the authors' En-De convention (docs/method.md section 6):
# normalised punctuation, Moses tokens, compounds split as ##AT##-##AT##, case-sensitive.
# Checksums: downloads are checked against SHA256SUMS in this directory (none shipped yet).
# A first run prints "WARNING: no checksum for FILE" and appends each sum to
# $WORK/downloads/SHA256SUMS.recorded; once verified, copy that file here as SHA256SUMS (or
# point CHECKSUMS at it) and later runs stop on any mismatch (examples/recipes/README.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SRC=${SRC:-en} TGT=${TGT:-de}
export PAIR_NAME=${PAIR_NAME:-"WMT14 En-De"}
export WORK=${WORK:-$PWD/wmt14_en_de}
export TRAIN_URLS=${TRAIN_URLS:-"http://statmt.org/wmt13/training-parallel-europarl-v7.tgz http://statmt.org/wmt13/training-parallel-commoncrawl.tgz http://statmt.org/wmt14/training-parallel-nc-v9.tgz"}
export TRAIN_PREFIXES=${TRAIN_PREFIXES:-"training/europarl-v7.de-en commoncrawl.de-en training/news-commentary-v9.de-en"}
export CHECKSUMS=${CHECKSUMS:-$HERE/SHA256SUMS}
export SACREBLEU_VALID=${SACREBLEU_VALID:-wmt13} SACREBLEU_TEST=${SACREBLEU_TEST:-wmt14/full}
export BPE_MERGES=${BPE_MERGES:-32000} JOINT_BPE=${JOINT_BPE:-1}
export TEACHER_UPDATES=${TEACHER_UPDATES:-100000}
export BLEU_CONVENTION=${BLEU_CONVENTION:-ende-compound}
exec bash "$HERE/../recipes/pipeline.sh" "$@"
