"""Q1: phase-1 update time and peak memory vs a plain student of the same shape.

For stu1 and stu2 generated from a teacher of the authors' size, fairseq's own
``Trainer`` runs update steps (Adam, label-smoothed CE 0.1, the authors' settings) on
one fixed batch, for the phase-1 WD model and for a plain ``transformer`` of the
student's shape (``wd-materialize``'s phase-2 flags). Steps alternate between the two
models, so load on the machine hits both alike; medians of wall and CPU time are
compared. One profiled step per model splits the time into fairseq's forward /
backward / grads / optimizer regions, and the generators' own forward+backward is
timed alone. Peak memory comes from one fresh worker process per model: peak RSS
above the RSS before the model is built (CPU), or torch.cuda.max_memory_allocated.

Target: phase-1 update <= 1.15x the plain student's.
"""

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

import torch
from wd_fairseq.checkpoints import phase2_flags

from common import (STUDENTS, USER_DIR, assets_of, add_common_args, environment,
                    fairseq_device_flags, print_table, resolve_device, run, use_threads,
                    write_results)

TARGET = 1.15
OPTIM = [
    "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "7e-4",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-7",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--seed", "1", "--required-batch-size-multiple", "1", "--num-workers", "0",
]
REGIONS = ("forward", "backward", "multiply-grads", "clip-grads", "optimizer")


def build_trainer(data, model_flags, max_tokens: int, device: str):
    """fairseq's Trainer (and task) for ``model_flags``, as fairseq-train builds them."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    argv = [str(data), *model_flags, *OPTIM, "--max-tokens", str(max_tokens),
            *fairseq_device_flags(device)]
    cfg = convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), argv))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    return Trainer(cfg, task, model, task.build_criterion(cfg.criterion)), task, model


def fixed_batch(task, max_tokens: int) -> dict:
    """The batch with the most target tokens among the train split's batches of
    ``max_tokens`` (fairseq caches one iterator per dataset: not reused here)."""
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=max_tokens,
        required_batch_size_multiple=1, seed=1, disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=False)
    return max(itr, key=lambda sample: sample["ntokens"])


def timed_step(trainer, sample, device: str):
    """(wall seconds, CPU seconds) of one update."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_step([sample])
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def region_seconds(trainer, sample) -> dict:
    """Seconds spent in fairseq's record_function regions during one update, and the
    number of operators it dispatched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        trainer.train_step([sample])
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in REGIONS}
    seconds = {f"{k}_s": totals.get(k, 0.0) for k in REGIONS}
    # Operators dispatched (nested ones included): what a step costs the CPU that issues
    # the work, whatever the device; on a GPU, small ones are kernel launches.
    # Matrix-multiply FLOPs (torch counts them for mm/addmm/bmm): the work no
    # implementation of the method avoids, whatever the device.
    return seconds | {"aten_ops": sum(e.name.startswith("aten::") for e in prof.events()),
                      "matmul_gflop": sum(e.flops for e in prof.events() if e.flops) / 1e9}


def generator_seconds(model) -> float:
    """Forward+backward of every generated tensor once (training mode): the work
    a phase-1 update adds for its weights, embedding rows excluded."""
    model.train()
    start = time.perf_counter()
    with torch.enable_grad(), model.generation_pass():
        tensors = [getattr(m, name) for m, name, _ in model.generated_tensors()
                   if not isinstance(m, torch.nn.Embedding)]
        tensors = [t for t in tensors if t.requires_grad]  # not an untrained copy
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    if tensors and tensors[0].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(spec: dict) -> None:
    """Build one model, run one update (allocates gradients and Adam state), print
    its memory as JSON."""
    use_threads(spec["threads"])
    device = spec["device"]
    before = rss_mib("VmRSS")
    trainer, task, _ = build_trainer(spec["data"], spec["flags"], spec["max_tokens"], device)
    trainer.train_step([fixed_batch(task, spec["max_tokens"])])
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mib("VmHWM") - before
    print("WORKER " + json.dumps({"peak_mib": peak}))


def worker_memory(args, data, flags, max_tokens: int, device: str) -> float:
    spec = {"data": str(data), "flags": flags, "max_tokens": max_tokens,
            "device": device, "threads": args.threads}
    out = run([sys.executable, __file__, "--worker", json.dumps(spec)]).stdout
    line = next(l for l in out.splitlines() if l.startswith("WORKER "))
    return json.loads(line[len("WORKER "):])["peak_mib"]


def trainable(model) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def parse_tokens(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"--max-tokens {text!r}: expected token counts separated by commas, e.g. 4096,16384")
    return values


def measure(args, data, device, student, pair, models, flags, max_tokens, task, settings):
    """Timed updates of both models on the same batch of ``max_tokens``; two rows."""
    sample = fixed_batch(task, max_tokens)
    times, regions = {name: [] for name in pair}, {}
    for step in range(settings["warmup"] + settings["steps"]):
        for name, trainer in pair.items():
            if step == settings["warmup"] - 1:  # the last warm-up step is profiled
                regions[name] = region_seconds(trainer, sample)
            elif step >= settings["warmup"]:
                times[name].append(timed_step(trainer, sample, device))
    with ThreadPoolExecutor(2) as pool:  # fresh processes, two at a time
        memory = dict(zip(pair, pool.map(
            lambda f: worker_memory(args, data, f, max_tokens, device), flags)))
    rows = []
    for name, model in zip(pair, models):
        rows.append({
            "student": student, "model": name, "max_tokens": max_tokens,
            "trainable_tensors": len(trainable(model)),
            "trainable_params_M": sum(p.numel() for p in trainable(model)) / 1e6,
            "update_wall_s": statistics.median(t[0] for t in times[name]),
            "update_cpu_s": statistics.median(t[1] for t in times[name]),
            "peak_mem_MiB": memory[name],
            **regions[name],
            "target_tokens": sample["ntokens"], "sentences": sample["nsentences"],
            "steps_wall_s": [t[0] for t in times[name]],
        })
    base, wd_row = rows
    for key in ("update_wall_s", "update_cpu_s", "peak_mem_MiB"):
        wd_row[key.rsplit("_", 1)[0] + "_ratio"] = wd_row[key] / base[key]
    for key in ("aten_ops", "matmul_gflop"):
        wd_row[f"{key}_ratio"] = wd_row[key] / base[key]
    return rows


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--max-tokens", type=parse_tokens,
                        help="batch sizes in tokens, comma-separated (default: 1024 with "
                        "--quick, else 4096, the authors' per-GPU batch)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    device = resolve_device(args.device)
    use_threads(args.threads)
    settings = ({"warmup": 1, "steps": 3} if args.quick else {"warmup": 2, "steps": 8})
    settings["max_tokens"] = args.max_tokens or ([1024] if args.quick else [4096])
    # One thread on CPU: CPU time is the work done, whatever else runs on the machine.
    primary = "update_cpu_ratio" if device == "cpu" and args.threads == 1 else "update_wall_ratio"
    assets = assets_of(args)
    data, teacher = assets.data(), assets.teacher()
    rows = []
    for student in STUDENTS:
        wd_flags = ["--user-dir", str(USER_DIR), *assets.student_flags(student),
                    "--teacher-path", str(teacher)]
        largest = max(settings["max_tokens"])
        wd, task, wd_model = build_trainer(data, wd_flags, largest, device)
        plain_flags = phase2_flags(wd_model.student_args)
        plain, _, plain_model = build_trainer(data, plain_flags, largest, device)
        for max_tokens in settings["max_tokens"]:
            rows += measure(args, data, device, student, {"plain": plain, "phase-1": wd},
                            (plain_model, wd_model), (plain_flags, wd_flags), max_tokens,
                            task, settings)
        rows[-1]["generators_fwd_bwd_s"] = generator_seconds(wd_model)
        del wd, plain, wd_model, plain_model
    for row in rows:
        if row["model"] == "phase-1":
            row["meets_target"] = row[primary] <= TARGET
    results = {"benchmark": "phase1_update", "mode": "quick" if args.quick else "full",
               "target_ratio": TARGET, "target_metric": primary, "settings": settings,
               "environment": environment(device), "rows": rows}
    path = write_results(args, "phase1_update", results)
    print_table(rows, ["student", "model", "max_tokens", "trainable_tensors", "trainable_params_M",
                       "target_tokens",
                       "update_wall_s", "update_wall_ratio", "update_cpu_s", "update_cpu_ratio",
                       "peak_mem_MiB", "peak_mem_ratio"])
    print()
    print_table(rows, ["student", "model", "max_tokens", "aten_ops", "aten_ops_ratio",
                       "matmul_gflop", "matmul_gflop_ratio",
                       *[f"{k}_s" for k in REGIONS], "generators_fwd_bwd_s"])
    print(f"\ntarget: phase-1 update <= {TARGET}x the plain student's ({primary}); met: "
          f"{[(r['student'], r['max_tokens']) for r in rows if r.get('meets_target')]}. "
          f"Results: {path}")


if __name__ == "__main__":
    main()
