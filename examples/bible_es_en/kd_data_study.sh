#!/usr/bin/env bash
# Do the KD-data engine and the optional filters change the KD student? Variants of the
# demo's KD data, each training the demo's KD student (same settings, KD_UPDATES updates),
# scored on the demo's test set and compared with a paired bootstrap against the student
# trained on fairseq-engine KD data with the same seed. Two seeds per engine show the
# training noise the differences have to be read against.
#
#   bash examples/demo.sh && bash examples/bible_es_en/kd_data_study.sh
#
# BASE (default work/demo): a finished demo run, whose data and teacher every variant
# links to. STUDY (default work/kd_data_study): one pipeline run per variant (finished
# variants are reused). FILTERS: the filter flags of the filtered variant. Results in OUT
# (default examples/bible_es_en/kd_data_study/): seed1.{md,json}, seed2.{md,json} and
# command.txt (settings, stage times, machine load).
set -euo pipefail

main() {
  local repo out
  repo=$(cd "$HERE/../.." && pwd)
  source "$repo/examples/setup_env.sh"
  export PYTHON=python OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
  BASE=$(cd "${BASE:-$repo/work/demo}" && pwd)
  STUDY=${STUDY:-$repo/work/kd_data_study}
  out=${OUT:-$HERE/kd_data_study}
  FILTERS=${FILTERS:-"--filter-length-ratio 2.0 --filter-min-score -1.6"}
  [ -e "$BASE/done/teacher" ] || { echo "kd_data_study.sh: $BASE has no finished teacher. Fix: run bash examples/demo.sh first (or set BASE)" >&2; exit 1; }
  export RAW_DIR=$BASE/corpus-demo
  WORK=$BASE source "$HERE/demo_settings.sh"
  mkdir -p "$STUDY"
  exec > >(tee -a "$STUDY/study.log") 2>&1
  echo "[kd-data-study] start $(date -u '+%F %T UTC'), load:$(uptime | sed 's/.*load average://')"

  variant fairseq-s1 fairseq-s1 1 KD_ENGINE=fairseq
  variant fairseq-s2 fairseq-s1 2
  variant int8-s1 int8-s1 1 KD_ENGINE=ctranslate2 KD_EXTRA="--quantization int8"
  variant int8-s2 int8-s1 2
  variant float32-s1 float32-s1 1 KD_ENGINE=ctranslate2 KD_EXTRA="--quantization float32"
  variant filtered-s1 filtered-s1 1 KD_ENGINE=ctranslate2 KD_EXTRA="--quantization int8 $FILTERS"
  variant filtered-s2 filtered-s1 2

  echo "[kd-data-study] end $(date -u '+%F %T UTC'), load:$(uptime | sed 's/.*load average://')"
  mkdir -p "$out"
  python "$HERE/tools.py" paired --base "fairseq KD data=$STUDY/fairseq-s1:kd_student" \
    --system "fairseq KD data, seed 2=$STUDY/fairseq-s2:kd_student" \
    "CTranslate2 int8=$STUDY/int8-s1:kd_student" "CTranslate2 float32=$STUDY/float32-s1:kd_student" \
    "CTranslate2 int8, filtered=$STUDY/filtered-s1:kd_student" \
    --out-prefix "$out/seed1" --title "KD student by KD data, seed 1 (Bible Es-En demo)" \
    --note "filters: $FILTERS"
  python "$HERE/tools.py" paired --base "fairseq KD data=$STUDY/fairseq-s2:kd_student" \
    --system "CTranslate2 int8=$STUDY/int8-s2:kd_student" \
    "CTranslate2 int8, filtered=$STUDY/filtered-s2:kd_student" \
    --out-prefix "$out/seed2" --title "KD student by KD data, seed 2 (Bible Es-En demo)" \
    --note "filters: $FILTERS"
  {
    echo "# $(nproc) CPUs; BASE=$BASE; every variant: run.sh kd_data kd_student evaluate"
    echo "bash examples/bible_es_en/kd_data_study.sh"
    WORK=$STUDY/fairseq-s1 bash "$HERE/run.sh" config
    for v in "$STUDY"/*/data-bin-kd/kd-train1/summary.json; do
      python -c 'import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[1], {k: s.get(k) for k in ("engine", "quantization", "threads", "sentences_per_second", "counts")})' "$v"
    done
    echo "# from $STUDY/study.log:"
    grep -E '^\[kd-data-study\] (start|end)|stage [a-z_0-9]+: done in' "$STUDY/study.log"
  } > "$out/command.txt"
  echo "[kd-data-study] results: $out/seed1.md $out/seed2.md $out/command.txt"
}

# variant NAME KD_FROM SEED [VAR=VALUE ...]: run NAME with the demo's data and teacher, the
# KD data of run KD_FROM (made here when KD_FROM is NAME, with the settings given), and a
# KD student trained with SEED, scored alone (EVAL_MODELS=kd_student).
variant() {
  local name=$1 kd_from=$2 seed=$3 run=$STUDY/$1 shared stage t=$SECONDS
  shift 3
  mkdir -p "$run/done"
  for shared in raw tok bpe data-bin teacher; do ln -sfn "$BASE/$shared" "$run/$shared"; done
  touch "$run/done/prepare" "$run/done/teacher"
  if [ "$kd_from" != "$name" ]; then
    ln -sfn "$STUDY/$kd_from/data-bin-kd" "$run/data-bin-kd"
    touch "$run/done/kd_data"
  fi
  for stage in kd_data kd_student evaluate; do
    [ -e "$run/done/$stage" ] && continue
    env "$@" WORK="$run" SEED="$seed" EVAL_MODELS=kd_student bash "$HERE/run.sh" "$stage" > /dev/null
    echo "[kd-data-study] $name: stage $stage: done in $((SECONDS - t))s"
    t=$SECONDS
  done
  echo "[kd-data-study] $name: KD student $(python -c 'import json, sys; print([r["sacrebleu"] for r in json.load(open(sys.argv[1]))["rows"] if r["model"] == "kd_student"][0])' "$run/results.json") sacreBLEU"
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# one line: bash has read all of it before running, so editing this file meanwhile is safe
main "$@"; exit
