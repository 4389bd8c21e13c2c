#!/usr/bin/env python3
"""Part ``costs`` of examples/bible_es_en/study.sh: the compute of one training update of
each kind the study's arms train, timed interleaved, so the report's time axis ranks arms
whatever else ran beside them.

    update_costs.py --plan faithful=PLAN --plan slice=PLAN --out costs.json --command CMD

Each PLAN is ``pipeline.sh plan``'s output for a study run with that WD_INIT. From them come
three fairseq-train commands: kd_student's (``plain``: KD, Selection + KD, the slice-start
control and WD's phase 2 all train that student on that data with that criterion) and each
init's wd_phase1 (``phase1_faithful``, ``phase1_slice``). fairseq's Trainer is built from
each as fairseq-train builds it; update steps on the same batches of the training data (a
shuffled sample of the real batches) then alternate between the three, in a rotating order,
in one process on one thread. The record holds each kind's median CPU seconds per update
(one thread: the work done, little moved by other processes) and median wall seconds.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))
from recipe_tools import sha256_file, write_atomic  # noqa: E402
from study import machine  # noqa: E402
from tools import read_lines  # noqa: E402

#: kind of update -> (plan, stage whose fairseq-train command trains it)
KINDS = {"plain": ("faithful", "kd_student"), "phase1_faithful": ("faithful", "wd_phase1"),
         "phase1_slice": ("slice", "wd_phase1")}


def training_argv(plan: str, stage: str) -> List[str]:
    """The arguments of the fairseq-train command of ``stage`` in a pipeline plan."""
    section = None
    for line in read_lines(plan):
        if line.startswith("== "):
            section = line[3:].split()[0]
        elif section == stage and line.lstrip().startswith("fairseq-train "):
            return shlex.split(line)[1:]
    sys.exit(f"update_costs.py: {plan}: no fairseq-train command in stage {stage}. "
             "Fix: give 'pipeline.sh plan' output of a study run (study.sh part costs makes it)")


def build_trainer(argv: List[str]):
    """fairseq's Trainer and task for a fairseq-train command line, as fairseq-train builds them."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    utils.import_user_module(cfg.common)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    return Trainer(cfg, task, model, task.build_criterion(cfg.criterion)), task, cfg


def sample_batches(task, cfg, count: int) -> List[Dict]:
    """``count`` batches of the training data as fairseq-train makes them (its max tokens),
    from a shuffled epoch: a sample of the batch sizes training sees."""
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=cfg.dataset.max_tokens,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple, seed=1,
        disable_iterator_cache=True).next_epoch_itr(shuffle=True)
    return [batch for _, batch in zip(range(count), itr)]


def measure(args) -> Dict:
    import torch

    torch.set_num_threads(1)
    plans = dict(spec.split("=", 1) for spec in args.plan)
    missing = {plan for plan, _ in KINDS.values()} - set(plans)
    if missing:
        sys.exit(f"update_costs.py: no --plan for {', '.join(sorted(missing))}. Fix: --plan faithful=PLAN --plan slice=PLAN")
    argvs = {kind: training_argv(plans[plan], stage) for kind, (plan, stage) in KINDS.items()}
    built = {kind: build_trainer(argv) for kind, argv in argvs.items()}
    _, task, cfg = built["plain"]
    batches = sample_batches(task, cfg, args.batches)
    kinds = list(KINDS)
    times: Dict[str, List] = {kind: [] for kind in kinds}
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        for kind in kinds[step % 3:] + kinds[:step % 3]:  # each kind first, second, third alike
            wall, cpu = time.perf_counter(), time.process_time()
            built[kind][0].train_step([batch])
            if step >= args.warmup:
                times[kind].append((time.process_time() - cpu, time.perf_counter() - wall))
    per_update = {kind: {"cpu_s": statistics.median(t[0] for t in ts), "wall_s": statistics.median(t[1] for t in ts)}
                  for kind, ts in times.items()}
    teacher = argvs["phase1_faithful"][argvs["phase1_faithful"].index("--teacher-path") + 1]
    return {"part": "costs", "command": args.command, "machine": machine(), "teacher_sha256": sha256_file(teacher),
            "threads": 1, "warmup_steps": args.warmup, "steps": args.steps,
            "batches": {"count": len(batches), "max_tokens": cfg.dataset.max_tokens,
                        "mean_target_tokens": statistics.mean(b["ntokens"] for b in batches)},
            "commands": {kind: shlex.join(["fairseq-train", *argv]) for kind, argv in argvs.items()},
            "per_update": per_update,
            "phase1_over_plain_cpu": {kind: per_update[kind]["cpu_s"] / per_update["plain"]["cpu_s"]
                                      for kind in kinds[1:]}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="append", required=True, metavar="INIT=PLAN",
                        help="pipeline.sh plan output of a study run with WD_INIT=INIT (faithful, slice)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--command", required=True, help="the command that makes this part")
    parser.add_argument("--steps", type=int, default=40, help="timed updates per kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates per kind first")
    parser.add_argument("--batches", type=int, default=20, help="distinct batches, cycled")
    args = parser.parse_args(argv)
    record = measure(args)
    write_atomic(args.out, json.dumps(record, indent=2) + "\n")
    for kind, cost in record["per_update"].items():
        print(f"update_costs.py: {kind}: {cost['cpu_s']:.3f} CPU s / update (one thread), {cost['wall_s']:.3f} s wall")
    print(f"update_costs.py: wrote {args.out}")


if __name__ == "__main__":
    main()
