"""What ``wd-distill`` reports: the plan (text, ``WORK/plan.json``), and the Python steps
of its last stages: the test references, the stock export, the results card
(``WORK/results.{md,json,png}``)."""

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional

from .stages import Stage, describe, fingerprints, status
from .files import write_atomic


def write_plan(job, checked, stages: List[Stage]) -> None:
    """``WORK/plan.json``: what the card reports of the run (method, settings, commands)."""
    record = {"method": job.chosen_method, "chosen_by": "auto" if job.method == "auto" else "--method",
              "directions": ["-".join(d) for d in checked.directions], "updates": job.updates,
              "settings": {k: v for k, v in dataclasses.asdict(job).items()},
              "parameters": {"teacher": checked.teacher_params, "student": checked.student_params},
              "commands": [describe(a) for stage in stages for a in stage.actions]}
    write_atomic(job.path("plan.json"), json.dumps(record, indent=2, default=str) + "\n")


def plan_text(job, checked, stages: List[Stage], estimates: Optional[Dict[str, str]] = None) -> str:
    from .distill import AUTO_WD_BELOW
    from .distill_checks import resources

    why = (f"--method auto for {job.updates:,} updates: "
           + (f"WD slice below {AUTO_WD_BELOW:,}" if job.chosen_method == "wd-slice"
              else f"Selection + KD from {AUTO_WD_BELOW:,} on")) if job.method == "auto" else "--method"
    lines = [f"wd-distill: {job.chosen_method} ({why}); {', '.join('-'.join(d) for d in checked.directions)}; "
             f"work directory {job.path()}", *resources(job, checked)]
    prints = fingerprints(stages)
    for number, stage in enumerate(stages, 1):
        estimate = f" (estimate: {estimates[stage.name]})" if estimates and stage.name in estimates else ""
        lines.append(f"[{number}/{len(stages)}] {stage.name}: {status(stage, job.path(), prints[stage.name])}{estimate}")
        lines += [f"    {describe(a)}" for a in stage.actions]
    return "\n".join(lines)


def write_references(generate_log: str, out: str, lang: str) -> None:
    """The test split's targets as ``fairseq-generate --remove-bpe`` printed them (``T-``
    lines), Moses-detokenized, in corpus order: references for comparing models."""
    from sacremoses import MosesDetokenizer

    targets = {}
    with open(generate_log, encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.startswith("T-"):
                index, text = line.rstrip("\n").split("\t", 1)
                targets[int(index[2:])] = text
    detokenizer = MosesDetokenizer(lang)
    write_atomic(out, "".join(detokenizer.detokenize(targets[i].split()) + "\n"
                              for i in range(len(targets))))


def export_stock(checkpoint: str, out: str) -> None:
    """``out``: the trained student ``checkpoint`` as a stock fairseq checkpoint
    (``checkpoints.deployable_checkpoint``), written atomically."""
    import torch

    from .checkpoints import deployable_checkpoint, save_atomic

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_atomic(deployable_checkpoint(state), out)


def write_card(work: str) -> None:
    """``results.json``, ``results.md`` and ``results.png``: teacher against student
    (quality, speed, size) and every command of the run (``plan.json``)."""
    with open(os.path.join(work, "plan.json"), encoding="utf-8") as f:
        plan = json.load(f)
    eval_dir, export_dir = os.path.join(work, "eval"), os.path.join(work, "export")
    scores = {}  # direction -> {"teacher": record, "student": record}
    for pair in plan["directions"]:
        for name in ("teacher", "student"):
            with open(os.path.join(eval_dir, f"{name}.{pair}.json"), encoding="utf-8") as f:
                scores.setdefault(pair, {})[name] = json.load(f)
    ct2 = os.path.join(export_dir, "ct2-int8")
    sizes = {"student.pt": os.path.getsize(os.path.join(export_dir, "student.pt")),
             "ct2-int8": sum(os.path.getsize(os.path.join(ct2, f)) for f in os.listdir(ct2))}
    card = {**plan, "scores": scores, "speedup_vs_teacher": {
        pair: round(rows["student"]["sentences_per_second"] / rows["teacher"]["sentences_per_second"], 2)
        for pair, rows in scores.items()},
        "export": {"stock_checkpoint": os.path.join(export_dir, "student.pt"), "ctranslate2_int8": ct2,
                   "bytes": sizes}}
    write_atomic(os.path.join(work, "results.json"), json.dumps(card, indent=2) + "\n")
    lines = [f"# wd-distill: {card['method']} ({card['chosen_by']}), {', '.join(plan['directions'])}, "
             f"{card['updates']:,} updates", "",
             "| direction | model | sacreBLEU | chrF | sentences/s | speed vs teacher |",
             "|---|---|---:|---:|---:|---:|"]
    for pair, rows in scores.items():
        for name, row in rows.items():
            speed = row["sentences_per_second"] / rows["teacher"]["sentences_per_second"]
            lines.append(f"| {pair} | {name} | {row['sacrebleu']:.2f} | {row['chrf']:.2f} | "
                         f"{row['sentences_per_second']:.1f} | {speed:.2f}x |")
    first = next(iter(scores.values()))["teacher"]
    lines += ["", f"- sacreBLEU signature: `{first['sacrebleu_signature']}`",
              f"- test set: {plan['settings']['test_split']} (fairseq-generate, beam and batch of the run's "
              "evaluate stage; speed from that one decoding run)",
              f"- deploy: stock fairseq `{card['export']['stock_checkpoint']}` ({sizes['student.pt'] / 1e6:.1f} MB), "
              f"CTranslate2 int8 `{ct2}` ({sizes['ct2-int8'] / 1e6:.1f} MB)", "", "## Commands", ""]
    lines += [f"    {command}" for command in plan["commands"]]
    write_atomic(os.path.join(work, "results.md"), "\n".join(lines) + "\n")
    plot({f"{name} {pair}": row for pair, rows in scores.items() for name, row in rows.items()},
         os.path.join(work, "results.png"))


def plot(rows, path: str) -> None:
    """``results.png``: sacreBLEU and sentences/s of teacher and student, side by side
    (where matplotlib is installed: the package's ``demo`` extra)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for noisy in ("matplotlib", "PIL"):  # (fairseq leaves the root logger at DEBUG)
        logging.getLogger(noisy).setLevel(logging.WARNING)

    figure, axes = plt.subplots(1, 2, figsize=(7, 3))
    names = list(rows)
    for axis, key, label in ((axes[0], "sacrebleu", "sacreBLEU"), (axes[1], "sentences_per_second", "sentences/s")):
        axis.bar(names, [rows[n][key] for n in names], color=["#777777", "#2a7ab9"] * (len(names) // 2))
        axis.set_title(label)
        for i, name in enumerate(names):
            axis.annotate(f"{rows[name][key]:.2f}", (i, rows[name][key]), ha="center", va="bottom")
    figure.tight_layout()
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
