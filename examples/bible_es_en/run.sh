#!/usr/bin/env bash
# Bible Spanish->English (the corpus shipped in corpus/, offline): the whole WD pipeline
# (../recipes/pipeline.sh documents every stage and setting; any of them can be overridden
# from the environment).
#
#   examples/bible_es_en/run.sh                 # all stages, in $WORK (default ./bible_es_en)
#   examples/bible_es_en/run.sh teacher         # one stage (resumes when run again)
#
# Data: 28,172 training verse pairs, 1,000 valid, 1,000 test (corpus/README.md), extracted
# into $WORK/corpus unless RAW_DIR points elsewhere (examples/demo.sh passes a subset).
# Joint BPE (8k merges suit a corpus of this size), separate dictionaries. Without a GPU
# everything runs on the CPU in fp32. Model sizes and update counts are the pipeline's
# defaults (the authors'); examples/demo.sh and benchmark.sh set CPU-sized ones.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SRC=${SRC:-es} TGT=${TGT:-en}
export PAIR_NAME=${PAIR_NAME:-"Bible Es-En"}
export WORK=${WORK:-$PWD/bible_es_en}
if [ -z "${RAW_DIR:-}" ]; then
  RAW_DIR=$WORK/corpus
  "${PYTHON:-python}" "$HERE/corpus.py" "$RAW_DIR" > /dev/null
fi
export RAW_DIR
export BPE_MERGES=${BPE_MERGES:-8000} JOINT_BPE=${JOINT_BPE:-1}
export BLEU_CONVENTION=${BLEU_CONVENTION:-moses}
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  export CPU=${CPU:-1} FP16=${FP16:-0}
fi
exec bash "$HERE/../recipes/pipeline.sh" "$@"
