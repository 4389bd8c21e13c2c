#!/usr/bin/env bash
# The whole Weight Distillation pipeline, offline, on a 2-core CPU in about a quarter of an
# hour: the Spanish-English Bible corpus shipped in examples/bible_es_en, through the same
# scripts and flags as the full recipes (examples/recipes/pipeline.sh via
# examples/bible_es_en/run.sh), with small models and few updates:
#   BPE -> teacher -> sequence-level KD data -> KD student -> WD phase 1 -> materialise
#   -> WD phase 2 -> evaluation (sacreBLEU, chrF) -> decoding speed
# It ends with a table of teacher, KD student and WD student (BLEU, chrF, parameters,
# sentences/s, speed relative to the teacher) as JSON and Markdown, and a PNG plot of
# BLEU against decoding speed, all in $WORK.
#
#   bash examples/demo.sh            # finished stages of an earlier run are reused
#   bash examples/demo.sh --fresh    # start over (deletes $WORK)
#
# WORK (default: work/demo at the repository root) holds everything; logs/STAGE.log has
# each stage's full output. The first run creates the virtual environment
# (examples/setup_env.sh), which later runs reuse. The model, training and decoding
# settings below can be overridden from the environment (pipeline.sh documents them).
set -euo pipefail

main() {
  local repo bible marker start
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  bible=$repo/examples/bible_es_en
  export WORK=${WORK:-$repo/work/demo}
  marker=$WORK/.wd-demo
  case "${1:-}" in
    "") ;;
    --fresh)
      if [ -e "$WORK" ]; then
        [ -e "$marker" ] || { echo "demo.sh: $WORK was not made by demo.sh; not deleting it" >&2; exit 1; }
        rm -rf "$WORK"
      fi ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash examples/demo.sh [--fresh]" >&2; exit 2 ;;
  esac

  source "$repo/examples/setup_env.sh"
  export PYTHON=python
  mkdir -p "$WORK"
  touch "$marker"

  source "$bible/demo_settings.sh"

  start=$SECONDS
  echo "[demo] work directory $WORK"
  if [ ! -s "$RAW_DIR/test.en" ]; then
    python "$bible/corpus.py" "$WORK/corpus" > /dev/null
    python "$bible/tools.py" subset --corpus "$WORK/corpus" --out "$RAW_DIR.tmp" \
      --train 8000 --max-words 30 --valid 300 --test 500
    rm -rf "$RAW_DIR"
    mv "$RAW_DIR.tmp" "$RAW_DIR"
  fi
  STAGES_TAG=demo bash "$bible/stages.sh"
  python "$bible/tools.py" report --work "$WORK" --out-prefix "$WORK/demo_results" \
    --title "WD demo: Bible Es-En, $(wc -l < "$RAW_DIR/train.es") training pairs, CPU" \
    --note "speed: beam $BEAM, batch size $SPEED_BATCH_SIZE, one CPU thread"
  printf '[demo] finished in %dm%02ds (set-up not counted); results:\n' \
    $(( (SECONDS - start) / 60 )) $(( (SECONDS - start) % 60 ))
  for ext in md json png; do echo "  $WORK/demo_results.$ext"; done
}

# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
