"""Q2: decoding with the phase-1 model vs its materialised student.

Two ways a phase-1 checkpoint is decoded, each against the materialised student:

- ``generate``: as fairseq-generate, fairseq-interactive and the hub do it
  (``prepare_for_inference_``, which materialises the student in place);
- ``eval``: the model only put in eval mode, as fairseq-train's validation
  (``--eval-bleu``) does: generated weights are cached on first use.

All three are loaded and decoded with fairseq-generate's own code path
(``checkpoint_utils.load_model_ensemble``, ``task.build_generator``,
``task.inference_step``) on the same batches with the same beam; batches rotate
between them (each goes first in turn). Every hypothesis is pinned to the same length
(``--min-len L --max-len-b L``), so all do the same number of decoder steps. The
one-time set-up (in-place materialisation, or the cache fill) is timed on its
own; ratios are reported in steady state and amortised over the test set. Each
batch is decoded ``--repeats`` times per model and the fastest time kept.

Target: phase-1 decoding <= 1.05x the materialised student's.
"""

import argparse
import statistics
import time

import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from common import (STUDENTS, USER_DIR, assets_of, add_common_args, environment,
                    print_table, resolve_device, use_threads, write_results)

TARGET = 1.05
LENGTH = 30


def load(data, path, device: str, prepare: bool = True):
    """(task, models, generation cfg, (wall, CPU) seconds of ``prepare_for_inference_``)
    as fairseq-generate loads ``path`` (``prepare=False``: eval mode only)."""
    argv = [str(data), "--path", str(path), "--user-dir", str(USER_DIR),
            "--min-len", str(LENGTH), "--max-len-a", "0", "--max-len-b", str(LENGTH),
            "--required-batch-size-multiple", "1"]
    argv += ["--cpu"] if device == "cpu" else ["--fp16"]
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_generation_parser(), argv))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
    setup = (0.0, 0.0)
    for model in models:
        if device == "cuda":
            model.half().cuda()
        if prepare:
            setup = timed(lambda: model.prepare_for_inference_(cfg), device)[:2]
    return task, models, cfg, setup


def build_generator(task, models, cfg, beam: int):
    """fairseq's SequenceGenerator with beam ``beam`` (it puts the models in eval
    mode, which also empties a phase-1 weight cache)."""
    cfg.generation.beam = beam
    return task.build_generator(models, cfg.generation)


def batches(task, split: str, batch_size: int, limit: int, device: str):
    task.load_dataset(split)
    itr = task.get_batch_iterator(
        dataset=task.dataset(split), max_sentences=batch_size,
        required_batch_size_multiple=1, seed=1,
    ).next_epoch_itr(shuffle=False)
    out = []
    for sample in itr:
        if sum(s["nsentences"] for s in out) >= limit:
            break
        out.append(utils.move_to_cuda(sample) if device == "cuda" else sample)
    return out


def timed(fn, device: str):
    """(wall seconds, CPU seconds, result) of ``fn()``."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def fill_cache(model):
    """Generate (and cache) every student tensor once, as the first batch does."""
    with torch.no_grad():
        for module, name, _ in model.generated_tensors():
            getattr(module, name)


VARIANTS = ("student", "generate", "eval")


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--repeats", type=int, default=3,
                        help="decode every batch this many times per model and keep the "
                        "fastest (robust to a busy machine; default 3)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    use_threads(args.threads)
    split = "valid" if args.quick else "test"
    configs = ([(6, 16, 48), (1, 1, 16)] if args.quick
               else [(6, 16, 480), (6, 64, 480), (1, 1, 96), (1, 16, 480)])
    primary = "cpu" if device == "cpu" and args.threads == 1 else "wall"
    column = ("wall", "cpu").index(primary)
    assets = assets_of(args)
    data = assets.data()
    rows = []
    for student in STUDENTS:
        for beam, batch_size, limit in configs:
            # fresh models per configuration: in-place materialisation is one-way
            loaded = {"student": load(data, assets.student(student), device),
                      "generate": load(data, assets.phase1(student), device),
                      "eval": load(data, assets.phase1(student), device, prepare=False)}
            setups = {name: (task, models, build_generator(task, models, cfg, beam))
                      for name, (task, models, cfg, _) in loaded.items()}
            fill = timed(lambda: fill_cache(loaded["eval"][1][0]), device)
            setup = {"generate": loaded["generate"][3][column], "eval": fill[column]}
            samples = batches(setups["student"][0], split, batch_size, limit, device)
            times = {name: [] for name in VARIANTS}
            tokens = {name: 0 for name in VARIANTS}
            for i, sample in enumerate(samples):
                best, hypos = {name: float("inf") for name in VARIANTS}, {}
                for _ in range(args.repeats):
                    for name in VARIANTS[i % 3:] + VARIANTS[:i % 3]:  # rotate who goes first
                        task, models, generator = setups[name]
                        wall, cpu, hypos[name] = timed(
                            lambda: task.inference_step(generator, models, sample), device)
                        best[name] = min(best[name], (wall, cpu)[column])
                for name in VARIANTS:
                    times[name].append(best[name])
                    tokens[name] += sum(len(h[0]["tokens"]) for h in hypos[name])
            assert len(set(tokens.values())) == 1, f"pinned lengths differ: {tokens}"
            total = {name: sum(ts) for name, ts in times.items()}
            row = {"student": student, "beam": beam, "batch_size": batch_size,
                   "sentences": sum(s["nsentences"] for s in samples),
                   "tokens": tokens["student"], "student_s": total["student"]}
            for name in ("generate", "eval"):
                per_batch = [wd / stock for wd, stock in zip(times[name], times["student"])]
                row |= {f"{name}_s": total[name], f"{name}_setup_s": setup[name],
                        f"{name}_ratio": total[name] / total["student"],
                        f"{name}_ratio_median_batch": statistics.median(per_batch),
                        f"{name}_ratio_amortised": (total[name] + setup[name]) / total["student"]}
            row["meets_target"] = {name: row[f"{name}_ratio"] <= TARGET for name in ("generate", "eval")}
            rows.append(row)
            print(f"[{student} beam {beam} batch {batch_size}] steady ratio: generate "
                  f"{row['generate_ratio']:.3f}, eval {row['eval_ratio']:.3f}", flush=True)
    results = {"benchmark": "eval_decoding", "mode": "quick" if args.quick else "full",
               "target_ratio": TARGET, "time": primary, "pinned_length": LENGTH,
               "split": split, "repeats": args.repeats, "environment": environment(device), "rows": rows}
    path = write_results(args, "eval_decoding", results)
    print_table(rows, ["student", "beam", "batch_size", "sentences", "student_s",
                       "generate_ratio", "generate_setup_s", "eval_ratio",
                       "eval_ratio_median_batch", "eval_setup_s", "eval_ratio_amortised"])
    print(f"\ntimes are {primary} seconds; ratios are phase-1 / materialised student "
          f"(generate: prepare_for_inference_ as fairseq-generate; eval: eval mode only); "
          f"target: <= {TARGET}. Results: {path}")


if __name__ == "__main__":
    main()
