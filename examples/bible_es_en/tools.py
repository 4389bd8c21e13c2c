#!/usr/bin/env python3
"""Helpers of examples/demo.sh and examples/bible_es_en/benchmark.sh.

    tools.py subset --corpus DIR --out DIR --train N --max-words W [--valid N] [--test N]
                    [--pair es-en]
    tools.py report --work WORK --out-prefix PREFIX [--title T] [--note LINE ...]
    tools.py compare --work NAME=WORK ... --out-prefix PREFIX [--samples 1000] [--note LINE ...]
    tools.py paired --base LABEL=WORK:MODEL --system LABEL=WORK:MODEL ... --out-prefix PREFIX

``subset`` writes a raw-text directory for pipeline.sh (RAW_DIR) with N training pairs
of at most W words per side (and optionally fewer valid/test pairs), spread evenly over
the corpus. ``report`` turns one pipeline run into the demo's table (JSON, Markdown) and
a PNG of BLEU against decoding speed. ``compare`` puts the KD and WD students of several
runs (seeds) side by side, with paired bootstrap confidence intervals of the BLEU
difference WD - KD, scored in each run's own target language (``wd-evaluate`` records it).
``paired`` compares models of different runs on the same test set (e.g. KD students trained
on two kinds of KD data): each system against the base, on the same bootstrap resamples.
"""

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))
from recipe_tools import atomic_writer, write_atomic  # noqa: E402

#: (pipeline model name, label in tables and plots); wd_phase1 is the materialised
#: phase-1 student before phase 2.
MODELS = [("teacher", "teacher"), ("kd_student", "KD student"),
          ("wd_phase1", "WD after phase 1"), ("wd_student", "WD student")]


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def spread(indices: Sequence[int], n: int) -> List[int]:
    """``n`` of ``indices`` at evenly spaced positions (all of them if there are fewer)."""
    if n >= len(indices):
        return list(indices)
    return [indices[i * len(indices) // n] for i in range(n)]


def subset(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    langs = args.pair.split("-")
    for split in ("train", "valid", "test"):
        sides = [read_lines(os.path.join(args.corpus, f"{split}.{lang}")) for lang in langs]
        keep = list(range(len(sides[0])))
        if split == "train":
            keep = [i for i in keep if max(len(s[i].split()) for s in sides) <= args.max_words]
        keep = spread(keep, getattr(args, split) or len(keep))
        for lang, lines in zip(langs, sides):
            write_atomic(os.path.join(args.out, f"{split}.{lang}"), "".join(lines[i] + "\n" for i in keep))
        print(f"subset: {split}: {len(keep)} pairs")


#: Checkpoint of each model in a pipeline.sh work directory.
CHECKPOINTS = {"teacher": "teacher/checkpoint_avg.pt", "kd_student": "kd_student/checkpoint_avg.pt",
               "wd_phase1": "wd_phase2/init.pt", "wd_student": "wd_phase2/checkpoint_avg.pt"}


def count_parameters(checkpoint: str) -> Dict[str, int]:
    """Parameters of a fairseq checkpoint's model: all, and the decoder's (tied tensors once)."""
    import torch

    import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)

    logging.getLogger().setLevel(logging.WARNING)  # importing fairseq set it to DEBUG
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    seen, counts = set(), {"parameters": 0, "decoder_parameters": 0}
    for key, tensor in state.items():
        if key.endswith((".version", "._float_tensor")) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        counts["parameters"] += tensor.numel()
        if key.startswith("decoder."):
            counts["decoder_parameters"] += tensor.numel()
    return counts


def load_run(work: str) -> List[Dict]:
    """Rows of a pipeline run's results.json (first test set), labelled, with parameters."""
    with open(os.path.join(work, "results.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    test_set = rows[0]["test_set"]
    out = []
    for model, label in MODELS:
        row = next((r for r in rows if r["model"] == model and r["test_set"] == test_set), None)
        if row is None or "sacrebleu" not in row:
            sys.exit(f"{work}/results.json: no scores of {model}. Fix: run the evaluate and speed stages")
        out.append({**row, "label": label, **count_parameters(os.path.join(work, CHECKPOINTS[model]))})
    return out


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def markdown_table(rows: List[Dict]) -> List[str]:
    lines = ["| model | sacreBLEU | chrF | parameters | decoder parameters | sentences/s | speed vs teacher |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['sacrebleu']:.2f} | {r['chrf']:.2f} | {millions(r['parameters'])} | "
                     f"{millions(r['decoder_parameters'])} | {r['sentences_per_second']:.1f} | "
                     f"{r['speedup_vs_teacher']:.2f}x |")
    return lines


def signatures(rows: List[Dict]) -> List[str]:
    return [f"- sacreBLEU signature: `{rows[0]['sacrebleu_signature']}`",
            f"- chrF signature: `{rows[0]['chrf_signature']}`"]


def plot(rows: List[Dict], path: str, title: str) -> None:
    """PNG of sacreBLEU against decoding speed: one point per row, colour by model, marker
    by run, each named in the legend with its BLEU and speed relative to the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"teacher": "black", "kd_student": "tab:blue", "wd_phase1": "tab:gray",
               "wd_student": "tab:orange"}
    markers = {}
    fig, ax = plt.subplots(figsize=(8.4, 4.4), dpi=150)
    for r in rows:
        marker = markers.setdefault(r.get("run"), "osD^vP*X"[len(markers) % 8])
        ax.scatter(r["sentences_per_second"], r["sacrebleu"], s=60, color=colours[r["model"]],
                   marker=marker, zorder=3,
                   label=f"{r['label']}: {r['sacrebleu']:.1f} BLEU, {r['speedup_vs_teacher']:.2f}x")
    ax.set_xlabel("decoding speed (sentences/s)")
    ax.set_ylabel("sacreBLEU")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_writer(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def report(args) -> None:
    rows = load_run(args.work)
    test_set = rows[0]["test_set"]
    size = len(read_lines(os.path.join(args.work, "eval", f"teacher.{test_set}.hyp")))
    rounds = len(rows[0].get("rounds_sentences_per_second", [None]))
    notes = signatures(rows) + [
        f"- test set: {size} sentences; speed: sentences/s of fairseq-generate in the speed stage, "
        f"the median of {rounds} interleaved runs per model"
    ]
    shared = [r["label"] for r in rows if r.get("speed_shared_with")]
    if shared:
        notes.append(f"- speed: {', '.join(shared)} have one architecture: one speed, the median "
                     "of all their runs (their differences would be the machine's noise)")
    notes += [f"- {n}" for n in args.note]
    lines = [f"# {args.title}", ""] + markdown_table(rows) + [""] + notes
    write_atomic(args.out_prefix + ".md", "\n".join(lines) + "\n")
    document = {"title": args.title, "rows": rows, "notes": notes, "plot": os.path.basename(args.out_prefix) + ".png"}
    write_atomic(args.out_prefix + ".json", json.dumps(document, indent=2) + "\n")
    plot(rows, args.out_prefix + ".png", args.title)
    print("\n".join(lines))


def target_lang(work: str, rows: List[Dict]) -> str:
    """The target language a run was scored in (``wd-evaluate score`` records it)."""
    lang = rows[0].get("target_lang")
    if lang is None:
        sys.exit(f"{work}/results.json: no target_lang (made before wd-evaluate recorded it). "
                 "Fix: re-run its evaluate stage")
    return lang


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> np.ndarray:
    """Per-sentence sufficient statistics of sacreBLEU as wd-evaluate scores it in target
    language ``lang`` (13a tokenizer, one reference): N x 10 (hypothesis length, reference length, n-gram
    matches for n = 1..4, n-gram counts for n = 1..4). Uses sacreBLEU's internal
    ``_extract_corpus_statistics`` (sacrebleu is pinned; tests/test_demo.py checks that
    the statistics reproduce ``corpus_score``)."""
    from sacrebleu.metrics import BLEU

    return np.array(BLEU(trg_lang=lang)._extract_corpus_statistics(hypotheses, [references]),
                    dtype=np.int64)


def corpus_bleu(stats: np.ndarray) -> float:
    """Corpus BLEU of summed statistics (one row of 10), sacreBLEU's default smoothing."""
    from sacrebleu.metrics import BLEU

    return BLEU.compute_bleu(correct=stats[2:6].tolist(), total=stats[6:10].tolist(),
                             sys_len=int(stats[0]), ref_len=int(stats[1]), smooth_method="exp").score


def paired_bootstrap(pairs: Sequence[Sequence[np.ndarray]], samples: int, seed: int) -> np.ndarray:
    """BLEU(b) - BLEU(a) of every pair (a, b) of statistics, on the same ``samples``
    resamples (with replacement) of the test sentences: an array samples x pairs."""
    n = len(pairs[0][0])
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(samples)])
    diffs = np.empty((samples, len(pairs)))
    for j, (a, b) in enumerate(pairs):
        diffs[:, j] = [corpus_bleu(y) - corpus_bleu(x) for x, y in zip(counts @ a, counts @ b)]
    return diffs


def interval(observed: float, diffs: np.ndarray) -> Dict:
    """Observed difference, 95% percentile interval, share of resamples without a gain."""
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"wd_minus_kd": round(float(observed), 2), "ci95": [round(float(low), 2), round(float(high), 2)],
            "resamples_wd_not_better": round(float(np.mean(diffs <= 0)), 4)}


def verdict(result: Dict) -> str:
    low, high = result["ci95"]
    if low > 0:
        return "WD better than KD (the 95% interval excludes 0)"
    if high < 0:
        return "KD better than WD (the 95% interval excludes 0)"
    return "no clear difference (the 95% interval includes 0)"


def compare(args) -> None:
    runs = dict(item.split("=", 1) for item in args.work)
    rows, pairs, observed = [], [], []
    for i, (name, work) in enumerate(runs.items()):
        run_rows = load_run(work)
        test_set, lang = run_rows[0]["test_set"], target_lang(work, run_rows)
        refs = read_lines(os.path.join(work, "raw", f"{test_set}.{lang}"))
        stats = [bleu_statistics(read_lines(os.path.join(work, "eval", f"{m}.{test_set}.hyp")),
                                 refs, lang) for m in ("kd_student", "wd_student")]
        pairs.append(stats)
        observed.append(corpus_bleu(stats[1].sum(0)) - corpus_bleu(stats[0].sum(0)))
        rows += [dict(r, label=f"{r['label']} ({name})", run=name) for r in run_rows
                 if r["model"] in ("kd_student", "wd_student") or (r["model"] == "teacher" and i == 0)]
    diffs = paired_bootstrap(pairs, args.samples, args.seed)
    results = [dict(run=name, **interval(o, diffs[:, j])) for j, (name, o) in enumerate(zip(runs, observed))]
    bleu = {(r["run"], r["model"]): r["sacrebleu"] for r in rows}
    for r in results:
        r.update(kd=bleu[r["run"], "kd_student"], wd=bleu[r["run"], "wd_student"])
    if len(runs) > 1:
        mean = interval(np.mean(observed), diffs.mean(1))
        mean.update(run=f"mean of {len(runs)} runs", kd=round(float(np.mean([r["kd"] for r in results])), 2),
                    wd=round(float(np.mean([r["wd"] for r in results])), 2))
        results.append(mean)
    lines = [f"# {args.title}", "", "## Models", ""] + markdown_table(rows) + [
        "", "## WD - KD (sacreBLEU)", "",
        "| run | KD student | WD student | WD - KD | 95% CI (paired bootstrap) | resamples with WD <= KD | verdict |",
        "|---|---:|---:|---:|---|---:|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['kd']:.2f} | {r['wd']:.2f} | {r['wd_minus_kd']:+.2f} | "
                     f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] | {100 * r['resamples_wd_not_better']:.1f}% | "
                     f"{verdict(r)} |")
    notes = signatures(rows) + [
        f"- paired bootstrap: {args.samples} resamples of the test sentences (seed {args.seed}), the same "
        "resamples for every run; the mean row averages WD - KD over the runs on each resample"]
    if len(runs) > 1:
        notes.append(f"- WD - KD per run: {', '.join(f'{o:+.2f}' for o in observed)} "
                     f"(standard deviation over runs {np.std(observed, ddof=1):.2f})")
    notes += [
        "- the paper's claim at equal student size: WD beats KD by 0.51-1.82 BLEU"] + [f"- {n}" for n in args.note]
    lines += [""] + notes
    write_atomic(args.out_prefix + ".md", "\n".join(lines) + "\n")
    document = {"title": args.title, "rows": rows, "comparison": results, "notes": notes,
                "plot": os.path.basename(args.out_prefix) + ".png"}
    write_atomic(args.out_prefix + ".json", json.dumps(document, indent=2) + "\n")
    plot(rows, args.out_prefix + ".png", args.title)
    print("\n".join(lines))


def run_model(spec: str) -> Dict:
    """``LABEL=WORK:MODEL`` -> the model's row of that run (first test set), its
    hypotheses and references, and the label."""
    label, _, where = spec.partition("=")
    work, _, model = where.rpartition(":")
    if not (label and work and model):
        sys.exit(f"{spec}: expected LABEL=WORK:MODEL (e.g. base=work/demo:kd_student)")
    with open(os.path.join(work, "results.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    row = next((r for r in rows if r["model"] == model and "sacrebleu" in r
                and r["test_set"] == rows[0]["test_set"]), None)
    if row is None:
        sys.exit(f"{work}/results.json: no scores of {model}. Fix: run its evaluate stage "
                 f"(EVAL_MODELS={model})")
    lang = target_lang(work, [row])
    refs = read_lines(os.path.join(work, "raw", f"{row['test_set']}.{lang}"))
    hyps = read_lines(os.path.join(work, "eval", f"{model}.{row['test_set']}.hyp"))
    return dict(row, label=label, work=work, lang=lang, refs=refs, hyps=hyps)


def paired(args) -> None:
    base, systems = run_model(args.base), [run_model(s) for s in args.system]
    for system in systems:
        if (system["refs"], system["lang"]) != (base["refs"], base["lang"]):
            sys.exit(f"{system['work']}: its test references differ from {base['work']}'s. "
                     "Fix: compare runs scored on the same test set")
    stats = [bleu_statistics(m["hyps"], base["refs"], base["lang"]) for m in [base, *systems]]
    diffs = paired_bootstrap([(stats[0], s) for s in stats[1:]], args.samples, args.seed)
    lines = [f"# {args.title}", "", f"Base: {base['label']} ({base['sacrebleu']:.2f} sacreBLEU, "
             f"{base['chrf']:.2f} chrF).", "",
             "| system | sacreBLEU | chrF | - base | 95% CI (paired bootstrap) | resamples <= base |",
             "|---|---:|---:|---:|---|---:|"]
    results = []
    for j, system in enumerate(systems):
        observed = corpus_bleu(stats[j + 1].sum(0)) - corpus_bleu(stats[0].sum(0))
        result = interval(observed, diffs[:, j])
        result = {"system": system["label"], "base": base["label"], "sacrebleu": system["sacrebleu"],
                  "chrf": system["chrf"], "minus_base": result.pop("wd_minus_kd"), "ci95": result["ci95"],
                  "resamples_not_better": result["resamples_wd_not_better"]}
        results.append(result)
        lines.append(f"| {result['system']} | {result['sacrebleu']:.2f} | {result['chrf']:.2f} | "
                     f"{result['minus_base']:+.2f} | [{result['ci95'][0]:+.2f}, {result['ci95'][1]:+.2f}] | "
                     f"{100 * result['resamples_not_better']:.1f}% |")
    runs = ", ".join("{label} = {work}:{model}".format(**m) for m in [base, *systems])
    notes = [f"- runs: {runs}",
             f"- paired bootstrap: {args.samples} resamples of the {len(base['refs'])} test sentences "
             f"(seed {args.seed}), the same resamples for every system",
             f"- sacreBLEU {base['sacrebleu_signature']}"] + [f"- {n}" for n in args.note]
    lines += [""] + notes
    write_atomic(args.out_prefix + ".md", "\n".join(lines) + "\n")
    write_atomic(args.out_prefix + ".json", json.dumps(
        {"title": args.title, "base": {k: base[k] for k in ("label", "work", "model", "sacrebleu", "chrf")},
         "comparison": results, "notes": notes}, indent=2) + "\n")
    print("\n".join(lines))


def add_bootstrap_args(p: argparse.ArgumentParser, title: str, writes: str) -> None:
    """Output and resampling options of ``compare`` and ``paired``."""
    p.add_argument("--out-prefix", required=True, help=f"writes {writes}")
    p.add_argument("--title", default=title)
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=12345, help="seed of the resampling")
    p.add_argument("--note", action="append", default=[], help="a line under the tables")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("subset")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, required=True)
    p.add_argument("--max-words", type=int, required=True)
    p.add_argument("--valid", type=int, help="default: all")
    p.add_argument("--test", type=int, help="default: all")
    p.add_argument("--pair", default="es-en", help="SRC-TGT: the corpus files' languages "
                   "(default es-en; en-es reverses the direction)")
    p.set_defaults(run=subset)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True, help="pipeline.sh work directory")
    p.add_argument("--out-prefix", required=True, help="writes PREFIX.json, PREFIX.md, PREFIX.png")
    p.add_argument("--title", default="Results")
    p.add_argument("--note", action="append", default=[], help="a line under the table")
    p.set_defaults(run=report)
    p = sub.add_parser("compare")
    p.add_argument("--work", required=True, nargs="+", metavar="NAME=WORK",
                   help="pipeline.sh work directories of the runs (e.g. seed1=DIR)")
    add_bootstrap_args(p, "KD against WD", "PREFIX.json, PREFIX.md, PREFIX.png")
    p.set_defaults(run=compare)
    p = sub.add_parser("paired")
    p.add_argument("--base", required=True, metavar="LABEL=WORK:MODEL",
                   help="e.g. fairseq-KD=work/demo:kd_student (MODEL: a model of the run's "
                   "results.json: teacher, kd_student, wd_phase1, wd_student, sel_student)")
    p.add_argument("--system", required=True, nargs="+", metavar="LABEL=WORK:MODEL")
    add_bootstrap_args(p, "Paired comparison", "PREFIX.json and PREFIX.md")
    p.set_defaults(run=paired)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
