#!/usr/bin/env python3
"""Helpers of examples/bible_es_en/study.sh: budgets read off long runs, one record per
finished part, and the report.

    study.py budgets --arms ARM=RUN ... --budgets B ... --interval I --out DIR
    study.py part --part NAME --run RUN [--arms ARM=RUN ...] [--bases RUN] --out PART.json
                  --command CMD --settings FILE
    study.py report --parts PART.json ... --out-prefix PREFIX

Arms: ``kd`` and ``sel`` (a pipeline run whose kd_student / sel_student trained to the
largest budget), ``wd`` and ``wd_slice`` and the variants of WD slice (runs whose phase 1
trained P updates, P read off the run's phase-1 saves, and phase 2 the rest). Every save was
kept (``--keep-interval-updates -1``). The model of an arm at budget B (total training
updates) is the average of its saves at updates B - I and B (WD: phase-2 saves at B - P - I
and B - P); WD at B = P is the materialised phase-1 student.
``budgets`` writes those averages as DIR/ARM_B.pt and prints ``ARM_B=PATH ...`` for
pipeline.sh's EXTRA_MODELS; the evaluate stage of one run scores them all. ``part``
records the scores, a paired bootstrap of every arm against KD and against Selection + KD
at each budget (``--bases``: those two as scored by another evaluate run of the same seed),
the training wall-clock at each budget (from the stage log's timestamps, resumes added up;
WD: phase 1 + materialisation + phase 2), settings, stage times and the SHA-256 of the
teacher the run used. ``report`` refuses parts of another teacher than base's, then puts the
finished parts together: mean and standard deviation over seeds, the per-seed intervals,
the mean difference to each base over seeds with a t-interval (the seed-level verdict), the
update compute of every model (with part costs, update_costs.py: updates x CPU seconds per
update of their kind), and a plot of BLEU against updates and against that compute (without
part costs: against training wall-clock).
"""

import argparse
import datetime
import json
import os
import platform
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))
from recipe_tools import atomic_writer, average_checkpoints, sha256_file, write_atomic  # noqa: E402
from tools import (bleu_statistics, corpus_bleu, interval, paired_bootstrap,  # noqa: E402
                   read_lines)

#: arm -> (label, the save dir of its training in the arm's run); the last two: v1's variants
ARMS = {"kd": ("KD", "kd_student"), "sel": ("Selection + KD", "sel_student"),
        "slice_kd": ("Slice start + KD, no generator", "sel_student"),
        "wd": ("WD faithful", "wd_phase2"), "wd_slice": ("WD slice", "wd_phase2"),
        "wd_slice_restart": ("WD slice, authors' restart in phase 2", "wd_phase2"),
        "wd_slice_long": ("WD slice, long phase 1", "wd_phase2"),
        "wd_slice_word": ("WD slice, word-level KD in phase 1", "wd_phase2")}
#: the arms every other arm is compared with, at the same budget
BASES = ("kd", "sel")
_INTERVAL_SAVE = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")
_EPOCH_SAVE = re.compile(r"^checkpoint\d+\.pt$")
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| ")
_UPDATES = re.compile(r"\| train(?:_inner)? \|.*num_updates[= ](\d+)\b")
_FRESH = "No existing checkpoint found"
_RESUMED = re.compile(r"Loaded checkpoint .* @ (\d+) updates\)")


def arm_runs(items: Sequence[str]) -> Dict[str, str]:
    runs = {}
    for item in items:
        arm, _, run = item.partition("=")
        if arm not in ARMS or not run:
            sys.exit(f"--arms {item}: expected ARM=RUN with ARM one of {', '.join(ARMS)}")
        runs[arm] = run
    return runs


def saves_by_update(directory: str) -> Dict[int, str]:
    """{update: checkpoint} of every save in a fairseq save dir (interval saves by name,
    epoch-end saves by the update count stored in them)."""
    found = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        if m := _INTERVAL_SAVE.match(name):
            found[int(m.group(1))] = path
        elif _EPOCH_SAVE.match(name):
            import torch

            import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoint types)
            state = torch.load(path, map_location="cpu", weights_only=True)
            found[int(state["optimizer_history"][-1]["num_updates"])] = path
    return found


def phase1_updates(run: str) -> int:
    """The updates of a WD run's phase 1: its last interval save (the pipeline makes phase 1
    a multiple of the save interval)."""
    directory = os.path.join(run, "wd_phase1")
    saves = [int(m.group(1)) for name in (os.listdir(directory) if os.path.isdir(directory) else [])
             if (m := _INTERVAL_SAVE.match(name))]
    if not saves:
        sys.exit(f"{directory}: no phase-1 save. Fix: run the arm's wd_phase1 stage first")
    return max(saves)


def budget_checkpoints(arm: str, run: str, budget: int, phase1: int, interval: int) -> List[str]:
    """The checkpoints whose average is ``arm`` at ``budget`` total updates, ``phase1`` the
    run's phase-1 updates (WD) ([] if the budget is not one of the arm's: WD between its
    start and the end of phase 1, KD at 0). Budget 0 is the start: ``init.pt`` of a
    sel_student run, ``step0.pt`` (phase 1's generators at step 0, materialised) of a WD run."""
    wd = arm.startswith("wd")
    if budget == 0:
        start = os.path.join(run, "step0.pt") if wd else os.path.join(run, ARMS[arm][1], "init.pt")
        return [start] if ARMS[arm][1] == "sel_student" or os.path.exists(start) else []
    if wd and budget < phase1:
        return []
    if wd and budget == phase1:
        return [os.path.join(run, "wd_phase2", "init.pt")]
    directory = os.path.join(run, ARMS[arm][1])
    updates = budget - phase1 if wd else budget
    saves = saves_by_update(directory)
    needed = [updates - interval, updates] if updates > interval else [updates]
    missing = [u for u in needed if u not in saves]
    if missing:
        sys.exit(f"{directory}: no save at update(s) {missing} (has {sorted(saves)}). Fix: train the "
                 "arm to this budget with every save kept (TRAIN_EXTRA=--keep-interval-updates -1)")
    return [saves[u] for u in needed]


def budgets(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    models = []
    for arm, run in arm_runs(args.arms).items():
        phase1 = phase1_updates(run) if arm.startswith("wd") else 0
        for budget in sorted(set(args.budgets + ([phase1] if phase1 else []))):
            checkpoints = budget_checkpoints(arm, run, budget, phase1, args.interval)
            if not checkpoints:
                continue
            out = os.path.join(args.out, f"{arm}_{budget}.pt")
            if not os.path.exists(out) or os.path.getmtime(out) < max(map(os.path.getmtime, checkpoints)):
                average_checkpoints(checkpoints, out)
            models.append(f"{arm}_{budget}={out}")
    print(" ".join(models))


def wall_at(log: str, update: int) -> Optional[float]:
    """Training wall-clock at ``update`` from a stage log's timestamps. A run starts at its
    "No existing checkpoint" / "Loaded checkpoint ... @ U updates" line; a resumed segment adds
    to what the earlier ones had reached at U (work after that save was lost). (fairseq's own
    ``wall`` reads 0 for the rest of a resumed run: its stopwatch is not restarted on load.)"""
    total: Dict[int, float] = {}
    offset, start = 0.0, None
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            stamp = _STAMP.match(line)
            if not stamp:
                continue
            now = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            resumed = _RESUMED.search(line)
            if resumed or _FRESH in line:
                offset, start = (total.get(int(resumed.group(1)), 0.0) if resumed else 0.0), now
                continue
            m = _UPDATES.search(line)
            if m and start is not None:
                total[int(m.group(1))] = offset + now - start
    return total.get(update)


def stage_times(run: str) -> Dict[str, int]:
    path = os.path.join(run, "stage_times.tsv")
    times = {}
    if os.path.exists(path):
        for line in read_lines(path):
            stage, seconds = line.split("\t")
            times[stage] = times.get(stage, 0) + int(seconds)
    return times


def training_wall(arm: str, run: str, budget: int, phase1: int) -> Optional[float]:
    """Training wall-clock of ``arm`` up to ``budget`` updates, WD's generator included."""
    if budget == 0:
        return 0.0
    logs = os.path.join(run, "logs")
    if not arm.startswith("wd"):
        return wall_at(os.path.join(logs, f"{ARMS[arm][1]}.log"), budget)
    phase1_wall = wall_at(os.path.join(logs, "wd_phase1.log"), phase1)
    materialize = stage_times(run).get("materialize")
    if phase1_wall is None or materialize is None:
        return None
    if budget == phase1:
        return phase1_wall + materialize
    phase2_wall = wall_at(os.path.join(logs, "wd_phase2.log"), budget - phase1)
    return None if phase2_wall is None else phase1_wall + materialize + phase2_wall


def machine() -> Dict:
    """CPU count and model, and the load average as the part ends."""
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        model = next((line.split(":", 1)[1].strip() for line in read_lines("/proc/cpuinfo")
                      if line.startswith("model name")), model)
    return {"cpus": os.cpu_count(), "cpu": model, "load_at_end": [round(x, 2) for x in os.getloadavg()]}


def results_rows(run: str) -> Tuple[Dict[str, Dict], str]:
    """{model: row} of a run's results.json (its first test set) and that test set."""
    with open(os.path.join(run, "results.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    test_set = rows[0]["test_set"]
    return {r["model"]: r for r in rows if r["test_set"] == test_set and "sacrebleu" in r}, test_set


def teacher_sha256(run: str) -> str:
    """The SHA-256 of the averaged teacher a run used (RUN/teacher/checkpoint_avg.pt)."""
    return sha256_file(os.path.join(run, "teacher", "checkpoint_avg.pt"))


def part(args) -> None:
    record = {"part": args.part, "command": args.command, "machine": machine(),
              "settings": read_lines(args.settings), "stage_times": {},
              "teacher_sha256": teacher_sha256(args.run)}
    rows, test_set = results_rows(args.run)
    if args.part == "base":
        teacher = rows["teacher"]
        record["teacher"] = {k: teacher[k] for k in ("sacrebleu", "chrf", "sacrebleu_signature", "target_lang")}
        record["stage_times"]["base"] = stage_times(args.run)
    else:
        runs = arm_runs(args.arms)
        phase1 = {arm: phase1_updates(run) for arm, run in runs.items() if arm.startswith("wd")}
        lang = next(iter(rows.values()))["target_lang"]
        refs = read_lines(os.path.join(args.run, "raw", f"{test_set}.{lang}"))
        scored = [(args.run, rows, runs)]
        if args.bases:
            base_rows, base_test_set = results_rows(args.bases)
            if base_test_set != test_set:
                sys.exit(f"--bases {args.bases}: scored on {base_test_set}, not {test_set}. "
                         "Fix: name the evaluate run of the same seed and test set")
            scored.append((args.bases, base_rows, BASES))
        models, stats = [], {}
        for run, found, arms in scored:
            for name, row in found.items():
                arm, _, budget = name.rpartition("_")
                if arm not in arms or not budget.isdigit() or (arm, int(budget)) in stats:
                    continue
                budget = int(budget)
                hyps = read_lines(os.path.join(run, "eval", f"{name}.{test_set}.hyp"))
                stats[arm, budget] = bleu_statistics(hyps, refs, lang)
                if run == args.run:
                    models.append({"arm": arm, "budget": budget, "sacrebleu": row["sacrebleu"], "chrf": row["chrf"],
                                   "train_wall_s": training_wall(arm, runs[arm], budget, phase1.get(arm, 0))})
        pairs = [(base, arm, budget) for (arm, budget) in sorted(stats) if arm in runs for base in BASES
                 if base != arm and (base, budget) in stats]
        diffs = paired_bootstrap([(stats[b, n], stats[a, n]) for b, a, n in pairs], args.samples,
                                 args.seed) if pairs else None  # (one arm: nothing to compare)
        record["comparisons"] = []
        for j, (base, arm, budget) in enumerate(pairs):
            observed = corpus_bleu(stats[arm, budget].sum(0)) - corpus_bleu(stats[base, budget].sum(0))
            result = interval(observed, diffs[:, j])
            record["comparisons"].append({"arm": arm, "base": base, "budget": budget,
                                          "minus_base": result["wd_minus_kd"], "ci95": result["ci95"],
                                          "resamples_not_better": result["resamples_wd_not_better"]})
        lr = next((line.split("=", 1)[1] for line in record["settings"] if line.startswith("LR=")), None)
        record.update(lr=float(lr) if lr else None, lr_check=args.part.startswith("lr"))
        record.update(seed=args.train_seed or int(args.part.removeprefix("seed")), test_set=test_set,
                      target_lang=lang, sentences=len(refs), interval=args.interval,
                      phase1=phase1,
                      models=sorted(models, key=lambda m: (m["arm"], m["budget"])),
                      bootstrap={"samples": args.samples, "seed": args.seed},
                      sacrebleu_signature=next(iter(rows.values()))["sacrebleu_signature"])
        record["stage_times"] = {arm: stage_times(run) for arm, run in runs.items()}
    write_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print(f"study.py: wrote {args.out}")


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def over_seeds(differences: Sequence[float]) -> Dict:
    """Mean of per-seed differences with a two-sided 95% t-interval over seeds (None with
    one seed): what a new seed is expected to give, unlike a bootstrap of one seed's test set."""
    from scipy.stats import t

    n = len(differences)
    mean, std = mean_std(differences)
    if std is None:
        return {"mean": mean, "n": n, "ci95": None}
    half = float(t.ppf(0.975, n - 1)) * std / np.sqrt(n)
    return {"mean": mean, "n": n, "ci95": [mean - half, mean + half]}


def pm(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def report(args) -> None:
    parts = [json.load(open(p, encoding="utf-8")) for p in args.parts]
    base = next((p for p in parts if p["part"] == "base"), None)
    costs = next((p for p in parts if p["part"] == "costs"), None)
    seeds = sorted((p for p in parts if p["part"] not in ("base", "costs") and not p.get("lr_check")),
                   key=lambda p: p["seed"])
    checks = [p for p in parts if p.get("lr_check")]
    if base is None or not seeds:
        sys.exit("study.py report: needs the base part and at least one seed part. Fix: run study.sh base seed1")
    others = [path for path, p in zip(args.parts, parts) if p.get("teacher_sha256") != base.get("teacher_sha256")]
    if others:
        sys.exit(f"study.py report: {', '.join(others)} trained from another teacher than base's "
                 f"(teacher_sha256 {str(base.get('teacher_sha256'))[:12]}...). Fix: run those parts again "
                 "from this base (remove their records first), or report them with their own base")
    cells: Dict[Tuple[str, int], List[Dict]] = {}
    for p in seeds:
        for m in p["models"]:
            compute = update_compute_s(m["arm"], m["budget"], p, costs) if costs else None
            cells.setdefault((m["arm"], m["budget"]), []).append(dict(m, seed=p["seed"], compute_s=compute))
    comparisons: Dict[Tuple[str, str, int], List[Dict]] = {}
    for p in seeds:
        for c in p["comparisons"]:
            comparisons.setdefault((c["arm"], c["base"], c["budget"]), []).append(dict(c, seed=p["seed"]))
    teacher = base["teacher"]
    rows = []
    for (arm, budget), ms in sorted(cells.items(), key=lambda kv: (kv[0][1], list(ARMS).index(kv[0][0]))):
        walls = [m["train_wall_s"] for m in ms if m["train_wall_s"] is not None]
        row = {"arm": arm, "label": ARMS[arm][0], "budget": budget, "seeds": [m["seed"] for m in ms],
               "sacrebleu": [m["sacrebleu"] for m in ms], "chrf": [m["chrf"] for m in ms],
               "sacrebleu_mean_std": mean_std([m["sacrebleu"] for m in ms]),
               "chrf_mean_std": mean_std([m["chrf"] for m in ms]),
               "train_wall_min": round(float(np.mean(walls)) / 60, 1) if walls else None,
               "compute_min": round(float(np.mean([m["compute_s"] for m in ms])) / 60, 1) if costs else None}
        for b in BASES:
            row[f"vs_{b}"] = comparisons.get((arm, b, budget), [])
            if row[f"vs_{b}"]:
                row[f"vs_{b}_over_seeds"] = over_seeds([c["minus_base"] for c in row[f"vs_{b}"]])
        rows.append(row)

    def versus(row: Dict, b: str) -> str:
        cs = row[f"vs_{b}"]
        if not cs:
            return ""
        seeds = row[f"vs_{b}_over_seeds"]
        verdict = (f"**{seeds['mean']:+.2f}** [{seeds['ci95'][0]:+.2f}, {seeds['ci95'][1]:+.2f}] over {seeds['n']} seeds"
                   if seeds["ci95"] else f"{seeds['mean']:+.2f} (1 seed)")
        return "<br>".join([verdict] + [f"s{c['seed']}: {c['minus_base']:+.2f} [{c['ci95'][0]:+.2f}, "
                                        f"{c['ci95'][1]:+.2f}]" for c in cs])

    lines = [f"# {args.title}", "",
             f"Teacher: {teacher['sacrebleu']:.2f} sacreBLEU, {teacher['chrf']:.2f} chrF. "
             f"Seeds: {', '.join(str(seed) for seed in sorted({p['seed'] for p in seeds}))}; {seeds[0]['sentences']} test sentences.", "",
             "| updates | arm | seeds | sacreBLEU | chrF | training wall-clock (min) | update compute (CPU-min) | - KD: over seeds [95% t], per seed [95% CI] | - Selection + KD: over seeds [95% t], per seed [95% CI] |",
             "|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['label']} | {','.join(map(str, r['seeds']))} | {pm(r['sacrebleu'])} | "
                     f"{pm(r['chrf'])} | {'' if r['train_wall_min'] is None else r['train_wall_min']} | "
                     f"{'' if r['compute_min'] is None else r['compute_min']} | "
                     f"{versus(r, 'kd')} | {versus(r, 'sel')} |")
    first = seeds[0]
    phase1 = {arm: p["phase1"][arm] for p in seeds for arm in p["phase1"]}
    usual = max(set(phase1.values()), key=list(phase1.values()).count)
    other = "".join(f"; {ARMS[arm][0]}: {n}" for arm, n in phase1.items() if n != usual)
    notes = [f"- sacreBLEU {first['sacrebleu_signature']}; mean ± standard deviation over seeds",
             f"- the model at N updates: the average of the saves at N - {first['interval']} and N (WD: phase 1 "
             f"{usual} updates{other}, then phase-2 saves; WD at the end of phase 1 = the materialised phase-1 student)",
             "- over seeds: the mean of the per-seed differences with a 95% t-interval over seeds (n - 1 degrees "
             "of freedom): the verdict that carries to a new seed",
             f"- paired bootstrap per seed: {first['bootstrap']['samples']} resamples of the test sentences "
             f"(seed {first['bootstrap']['seed']}), the same resamples for every arm of a seed",
             "- training wall-clock: from the training log's timestamps (resumed runs added up), one CPU thread beside another arm's "
             "training on a 2-core machine; WD: phase 1 + materialisation + phase 2"]
    if costs:
        per = costs["per_update"]
        notes.append("- update compute: updates x the CPU seconds of one update of their kind on one thread (part "
                     f"costs: {costs['steps']} updates of each kind, interleaved, medians: KD student "
                     f"{per['plain']['cpu_s']:.3f} s, WD phase 1 faithful {per['phase1_faithful']['cpu_s']:.3f} s, "
                     f"slice {per['phase1_slice']['cpu_s']:.3f} s); WD adds its materialisation's seconds. "
                     "Data loading, validation and saves are left out (alike in every arm): the plot's time axis")
    notes += [f"- {n}" for n in args.note]
    check_rows = learning_rate_check(seeds, checks)
    if check_rows:
        rates = sorted({lr for row in check_rows for lr in row["sacrebleu_by_lr"]}, key=float)
        lines += ["", f"Learning-rate check: sacreBLEU at {check_rows[0]['budget']} updates, seed "
                  f"{check_rows[0]['seed']}, by peak learning rate", "",
                  "| arm | " + " | ".join(rates) + " |", "|---|" + "---:|" * len(rates)]
        lines += [f"| {row['label']} | " + " | ".join(
            f"{row['sacrebleu_by_lr'][lr]:.2f}" if lr in row["sacrebleu_by_lr"] else "" for lr in rates) + " |"
            for row in check_rows]
    lines += [""] + notes
    os.makedirs(os.path.dirname(os.path.abspath(args.out_prefix)), exist_ok=True)
    write_atomic(args.out_prefix + ".md", "\n".join(lines) + "\n")
    document = {"title": args.title, "teacher": teacher, "rows": rows, "learning_rate_check": check_rows,
                "notes": notes,
                "parts": [{"part": p["part"], "command": p["command"], "machine": p["machine"],
                           "stage_times": p.get("stage_times", {})} for p in parts],
                "update_costs": costs and {"per_update": costs["per_update"], "threads": costs["threads"],
                                           "steps": costs["steps"], "batches": costs["batches"]},
                "plot": os.path.basename(args.out_prefix) + ".png"}
    write_atomic(args.out_prefix + ".json", json.dumps(document, indent=2) + "\n")
    plot(rows, seeds, teacher, args.out_prefix + ".png", args.title, costs)
    print("\n".join(lines))


def learning_rate_check(seeds: List[Dict], checks: List[Dict]) -> List[Dict]:
    """The arms of the learning-rate check parts at their largest budget: sacreBLEU by peak
    rate, the check's seed's own part giving its rate."""
    if not checks:
        return []
    seed, arms = checks[0]["seed"], {m["arm"] for p in checks for m in p["models"]}
    budget = max(m["budget"] for p in checks for m in p["models"])
    found: Dict[str, Dict[str, float]] = {}
    for p in [s for s in seeds if s["seed"] == seed] + checks:
        for m in p["models"]:
            if m["arm"] in arms and m["budget"] == budget and p.get("lr") is not None:
                found.setdefault(m["arm"], {})[f"{p['lr']:g}"] = m["sacrebleu"]
    return [{"arm": arm, "label": ARMS[arm][0], "seed": seed, "budget": budget, "sacrebleu_by_lr": found[arm]}
            for arm in ARMS if arm in found]


def update_compute_s(arm: str, budget: int, part: Dict, costs: Dict) -> float:
    """CPU seconds (one thread) of an arm's first ``budget`` updates in a seed part: updates x
    the costs part's per-update CPU seconds of their kind; WD: phase 1's kind, then (with the
    materialisation's recorded seconds) the plain student's."""
    per = {kind: cost["cpu_s"] for kind, cost in costs["per_update"].items()}
    if not arm.startswith("wd"):
        return budget * per["plain"]
    phase1, kind = part["phase1"][arm], "phase1_faithful" if arm == "wd" else "phase1_slice"
    if budget < phase1:
        return budget * per[kind]
    return phase1 * per[kind] + part["stage_times"][arm].get("materialize", 0) + (budget - phase1) * per["plain"]


def plot(rows: List[Dict], seeds: List[Dict], teacher: Dict, path: str, title: str, costs: Optional[Dict]) -> None:
    """BLEU against updates and against update compute (without a costs part: training
    wall-clock): each seed a dot, the mean a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for k, arm in enumerate(ARMS):
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        color = f"C{k}"
        axes[0].plot([r["budget"] for r in mine], [r["sacrebleu_mean_std"][0] for r in mine], "-", color=color,
                     label=ARMS[arm][0])
        for p in seeds:
            ms = sorted((m for m in p["models"] if m["arm"] == arm), key=lambda m: m["budget"])
            axes[0].plot([m["budget"] for m in ms], [m["sacrebleu"] for m in ms], ".", color=color, alpha=0.6)
            if costs:
                timed = [(update_compute_s(arm, m["budget"], p, costs), m["sacrebleu"]) for m in ms]
            else:
                timed = [(m["train_wall_s"], m["sacrebleu"]) for m in ms if m["train_wall_s"] is not None]
            axes[1].plot([t / 60 for t, _ in timed], [b for _, b in timed], ".-",
                         color=color, alpha=0.6, label=ARMS[arm][0] if p is seeds[0] else None)
    for ax in axes:
        ax.axhline(teacher["sacrebleu"], color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training updates (lines: mean over seeds)")
    axes[1].set_xlabel("update compute, CPU-minutes on one thread (one line per seed)" if costs
                       else "training wall-clock, minutes (one line per seed)")
    axes[0].set_ylabel("sacreBLEU (test)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_writer(path, "wb", suffix=".png") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("budgets")
    p.add_argument("--arms", nargs="+", required=True, metavar="ARM=RUN")
    p.add_argument("--budgets", nargs="+", type=int, required=True, help="total training updates")
    p.add_argument("--interval", type=int, required=True, help="updates between saves")
    p.add_argument("--out", required=True, help="directory of the averaged checkpoints")
    p.set_defaults(func=budgets)
    p = sub.add_parser("part")
    p.add_argument("--part", required=True, help="base or seedN")
    p.add_argument("--run", required=True, help="the run whose evaluate stage scored the part's models")
    p.add_argument("--arms", nargs="*", default=[], metavar="ARM=RUN")
    p.add_argument("--bases", help="an evaluate run of the same seed that scored kd_B and sel_B (the "
                   "comparisons' bases) when this part's run did not")
    p.add_argument("--train-seed", type=int, help="the arms' training seed (default: N of --part seedN)")
    p.add_argument("--interval", type=int, default=0, help="updates between saves")
    p.add_argument("--out", required=True)
    p.add_argument("--command", required=True, help="the command that makes this part")
    p.add_argument("--settings", required=True, help="file with the part's resolved settings")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=12345, help="seed of the resampling")
    p.set_defaults(func=part)
    p = sub.add_parser("report")
    p.add_argument("--parts", nargs="+", required=True)
    p.add_argument("--out-prefix", required=True, help="writes PREFIX.md, PREFIX.json, PREFIX.png")
    p.add_argument("--title", default="Which method? KD, Selection + KD and WD at equal updates")
    p.add_argument("--note", action="append", default=[])
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
