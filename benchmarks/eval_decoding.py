"""Q2: decoding with the phase-1 model (eval mode) vs its materialised student.

Both checkpoints are loaded and decoded with fairseq-generate's own code path
(``checkpoint_utils.load_model_ensemble``, ``task.build_generator``,
``task.inference_step``) on the same batches with the same beam; batches alternate
between the two models. Every hypothesis is pinned to the same length
(``--min-len L --max-len-b L``), so both do the same number of decoder steps.
In eval mode the phase-1 model generates its weights once and caches them: that
one-time fill is timed on its own, and the ratio is reported in steady state and
amortised over the test set.

Target: phase-1 decoding <= 1.05x the materialised student's.
"""

import argparse
import statistics
import time

import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from common import (STUDENTS, USER_DIR, Assets, add_common_args, environment,
                    print_table, resolve_device, use_threads, write_results)

TARGET = 1.05
LENGTH = 30


def load(data, path, device: str):
    """(task, models, generation cfg) as fairseq-generate loads ``path``."""
    argv = [str(data), "--path", str(path), "--user-dir", str(USER_DIR),
            "--min-len", str(LENGTH), "--max-len-a", "0", "--max-len-b", str(LENGTH),
            "--required-batch-size-multiple", "1"]
    argv += ["--cpu"] if device == "cpu" else ["--fp16"]
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_generation_parser(), argv))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
    for model in models:
        if device == "cuda":
            model.half().cuda()
        model.prepare_for_inference_(cfg)
    return task, models, cfg


def build_generator(task, models, cfg, beam: int):
    """fairseq's SequenceGenerator with beam ``beam`` (it puts the models in eval
    mode, which also empties the phase-1 weight cache)."""
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


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args()
    device = resolve_device(args.device)
    use_threads(args.threads)
    split = "valid" if args.quick else "test"
    configs = ([(6, 16, 48), (1, 1, 16)] if args.quick
               else [(6, 16, 480), (6, 64, 480), (1, 1, 96), (1, 16, 480)])
    primary = "cpu" if device == "cpu" and args.threads == 1 else "wall"
    assets = Assets(args.workdir)
    data = assets.data()
    rows = []
    for student in STUDENTS:
        loaded = {"phase-1": load(data, assets.phase1(student), device),
                  "student": load(data, assets.student(student), device)}
        for beam, batch_size, limit in configs:
            setups = {name: (task, models, build_generator(task, models, cfg, beam))
                      for name, (task, models, cfg) in loaded.items()}
            fill_wall, fill_cpu, _ = timed(lambda: fill_cache(loaded["phase-1"][1][0]), device)
            samples = batches(setups["student"][0], split, batch_size, limit, device)
            times = {name: [] for name in setups}
            tokens = {name: 0 for name in setups}
            for sample in samples:
                for name, (task, models, generator) in setups.items():
                    wall, cpu, hypos = timed(
                        lambda: task.inference_step(generator, models, sample), device)
                    times[name].append((wall, cpu))
                    tokens[name] += sum(len(h[0]["tokens"]) for h in hypos)
            assert tokens["phase-1"] == tokens["student"], "pinned lengths differ"
            total = {name: {"wall": sum(t[0] for t in ts), "cpu": sum(t[1] for t in ts)}
                     for name, ts in times.items()}
            fill = {"wall": fill_wall, "cpu": fill_cpu}
            steady = total["phase-1"][primary] / total["student"][primary]
            amortised = (total["phase-1"][primary] + fill[primary]) / total["student"][primary]
            column = ("wall", "cpu").index(primary)
            per_batch = [wd[column] / stock[column]
                         for wd, stock in zip(times["phase-1"], times["student"])]
            rows.append({
                "student": student, "beam": beam, "batch_size": batch_size,
                "sentences": sum(s["nsentences"] for s in samples), "tokens": tokens["student"],
                "student_s": total["student"][primary], "phase1_s": total["phase-1"][primary],
                "cache_fill_s": fill[primary], "ratio_steady": steady,
                "ratio_median_batch": statistics.median(per_batch),
                "ratio_amortised": amortised, "meets_target": steady <= TARGET,
                "wall": {k: v["wall"] for k, v in total.items()} | {"cache_fill": fill_wall},
                "cpu": {k: v["cpu"] for k, v in total.items()} | {"cache_fill": fill_cpu},
            })
            print(f"[{student} beam {beam} batch {batch_size}] steady ratio {steady:.3f}", flush=True)
    results = {"benchmark": "eval_decoding", "mode": "quick" if args.quick else "full",
               "target_ratio": TARGET, "time": primary, "pinned_length": LENGTH,
               "split": split, "environment": environment(device), "rows": rows}
    path = write_results(args, "eval_decoding", results)
    print_table(rows, ["student", "beam", "batch_size", "sentences", "tokens", "student_s",
                       "phase1_s", "ratio_steady", "ratio_median_batch", "cache_fill_s",
                       "ratio_amortised"])
    print(f"\ntimes are {primary} seconds; target: steady ratio <= {TARGET}. Results: {path}")


if __name__ == "__main__":
    main()
