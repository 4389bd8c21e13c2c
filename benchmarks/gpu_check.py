"""The GPU check: the fp16 claims measured in one run, results in one JSON file.

    python benchmarks/gpu_check.py --out DIR [--parts ...] [--budget-s 480] [--dry-run]

Parts (each a child process with a time limit; the JSON ``DIR/gpu_check.json`` is
rewritten after each, so a run stopped early still reports what finished):

- ``environment``: GPU, driver, torch / CUDA / cuDNN / fairseq versions, the cuBLAS
  libraries the machine has (CTranslate2's wheel needs a given major version);
- ``smoke``: ``examples/fp16_smoke.sh`` with ``--fp16`` (``--smoke-runs`` times) and
  ``--amp`` (teacher, 50 WD phase-1 updates, materialise), side by side; the
  benchmarks' shared assets are built on the CPU meanwhile. fairseq 0.12's ``--bf16``
  sets ``--tpu`` (TPUs only), so it has no GPU run;
- ``phase1``: ``phase1_update.py``: phase-1 update time and peak GPU memory against
  the plain student, authors' shapes, fp16, batches of 4,096 tokens (the authors' per
  GPU) and 16,384;
- ``decoding``: ``decoding_speed.py``: teacher, stu1, stu2 through fairseq-generate
  in fp16 (beam 6 batch 1 on 48 sentences; beam 6 and 1, batch 64 on 480), plus the
  CTranslate2 rows where CTranslate2 can use the GPU.

- ``kd_data``: ``kd_data_speed.py``: ``wd-kd-data`` sentences/s with fairseq fp16,
  CTranslate2 float16 and int8_float16 on every visible GPU, beam 6, the random-weight
  teacher of the authors' size (every hypothesis runs to the length limit); an engine
  that cannot run is recorded with its error.

``--dry-run`` runs every part on the CPU at toy sizes (fp32 smoke, ``--assets
tiny``): it checks this script and the ones it calls, and measures nothing.
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("environment", "smoke", "phase1", "decoding", "kd_data")
PRECISIONS = ("fp16", "amp")
BF16 = ("not run: fairseq 0.12's --bf16 sets --tpu and trains on TPUs only (on a GPU "
        "its Trainer fails in get_tpu_device); bf16 numerics are tested on the CPU")
#: Targets of the issue, checked where the numbers come in.
TARGET_PHASE1_RATIO = 1.15
TARGET_STU1_SPEEDUP = 1.88


def run_logged(cmd, log: Path, timeout: float, env=None) -> dict:
    """Run ``cmd`` with output to ``log``; its exit status and wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, timeout=timeout,
                                  cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    status = {"ok": code == 0, "exit": code, "seconds": round(time.perf_counter() - start, 1)}
    if code != 0:
        status["log_tail"] = log.read_text(errors="replace")[-3000:]
    return status


def cublas_libraries() -> list:
    """File names of the cuBLAS libraries on the loader's and Python's paths."""
    dirs = os.environ.get("LD_LIBRARY_PATH", "").split(":") + [
        "/usr/lib/x86_64-linux-gnu", "/usr/local/cuda/lib64", "/usr/local/nvidia/lib64"]
    dirs += [os.path.join(p, "nvidia", "*", "lib") for p in sys.path if p]
    found = set()
    for d in dirs:
        found.update(os.path.basename(f) for f in glob.glob(os.path.join(d, "libcublas.so*")))
    return sorted(found)


def environment(dry_run: bool) -> dict:
    import fairseq
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "fairseq": fairseq.__version__, "cpu_count": os.cpu_count(),
            "cuda_available": torch.cuda.is_available(), "cublas_libraries": cublas_libraries()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
                 "gpu_count": torch.cuda.device_count(),
                 "compute_capability": f"{props.major}.{props.minor}"}
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        info["driver"] = query.stdout.strip() or None
    elif not dry_run:
        raise SystemExit("gpu_check.py: torch sees no CUDA GPU. Fix: run it on a GPU machine, "
                         "or pass --dry-run to check the script on the CPU")
    try:
        import ctranslate2

        info["ctranslate2"] = ctranslate2.__version__
        info["ctranslate2_cuda_devices"] = ctranslate2.get_cuda_device_count()
    except ImportError:
        info["ctranslate2"] = None
    return info


def smoke(args, work: Path, logs: Path) -> dict:
    """fp16_smoke.sh in each precision (fp32 on CPU in a dry run), side by side with
    the building of the benchmarks' assets."""
    runs = {}
    precisions = ["fp32"] if args.dry_run else ["fp16"] * args.smoke_runs + ["amp"]
    for i, precision in enumerate(precisions):
        name = f"{precision}-{i + 1}" if precisions.count(precision) > 1 else precision
        env = {"FP16_SMOKE_PHASE1_UPDATES": str(args.phase1_updates),
               "FP16_SMOKE_TEACHER_UPDATES": str(args.teacher_updates),
               "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's Python stack
        env |= {"FP16_SMOKE_CPU": "1"} if args.dry_run else {"FP16_SMOKE_PRECISION": precision}
        runs[name] = (["bash", REPO / "examples" / "fp16_smoke.sh", work / f"smoke-{name}"],
                      logs / f"smoke-{name}.log", env)
    assets = [sys.executable, __file__, "--build-assets", *asset_flags(args)]
    with ThreadPoolExecutor(len(runs) + 1) as pool:
        building = pool.submit(run_logged, assets, logs / "assets.log", args.part_timeout_s)
        futures = {p: pool.submit(run_logged, cmd, log, args.part_timeout_s, env)
                   for p, (cmd, log, env) in runs.items()}
        results = {p: f.result() for p, f in futures.items()}
        results["assets"] = building.result()
    for name, (cmd, log, _) in runs.items():
        checks = [json.loads(line) for line in log.read_text().splitlines()
                  if line.startswith("{")]
        results[name]["runs"] = checks  # teacher, then phase 1
        results[name]["aborted_at_exit"] = [  # fp16_smoke.sh's exit status 3
            line.split("WARNING: ", 1)[1].split(" aborted", 1)[0]
            for line in log.read_text().splitlines() if "aborted at process exit" in line]
        for stage_log in Path(cmd[-1]).glob("*.log"):  # each stage's own log
            stage_log.replace(logs / f"smoke-{name}-{stage_log.name}")
    if not args.dry_run:
        results["bf16"] = BF16
    return results


def asset_flags(args) -> list:
    return ["--assets", "tiny" if args.dry_run else "authors", "--workdir", args.work / "bench"]


def build_assets(argv) -> None:
    """Child process: every checkpoint the benchmarks below use, built once."""
    sys.path.insert(0, str(HERE))
    from common import STUDENTS, add_common_args, assets_of

    assets = assets_of(add_common_args(argparse.ArgumentParser()).parse_args(argv))
    for name in ("teacher", *STUDENTS):
        assets.stock(name)


def benchmark(script: str, args, logs: Path, name: str, *flags) -> dict:
    """One benchmark script on the GPU (CPU in a dry run); its JSON results."""
    output = args.out / f"{name}.json"
    device = ["--device", "cpu", "--quick"] if args.dry_run else ["--device", "cuda"]
    status = run_logged([sys.executable, HERE / script, *device, *asset_flags(args),
                         "--output", output, *flags], logs / f"{name}.log", args.part_timeout_s)
    if status["ok"]:
        status["results"] = json.loads(output.read_text())
    return status


def phase1(args, logs: Path) -> dict:
    tokens = ["--max-tokens", "512,1024" if args.dry_run else "4096,16384"]
    status = benchmark("phase1_update.py", args, logs, "phase1_update", *tokens)
    if status["ok"]:
        status["summary"] = {
            f"{row['student']} at {row['max_tokens']} tokens": {
                k: row[k] for k in ("update_wall_ratio", "peak_mem_ratio", "update_wall_s",
                                    "peak_mem_MiB")}
            for row in status["results"]["rows"] if row["model"] == "phase-1"}
        status["target"] = f"update_wall_ratio <= {TARGET_PHASE1_RATIO}"
    return status


def decoding(args, logs: Path) -> dict:
    runs = {"decoding_speed_valid": ["--split", "valid", "--configs", "6x1", "--repeats", "1"]}
    if not args.dry_run:  # one run checks the script
        runs["decoding_speed_test"] = ["--split", "test", "--configs", "6x64,1x64", "--repeats", "1"]
    results = {name: benchmark("decoding_speed.py", args, logs, name, *flags)
               for name, flags in runs.items()}
    speedups = {}
    for name, status in results.items():
        for row in status.get("results", {}).get("rows", []):
            key = f"{row['model']} {row['engine']} {row['weights']} beam {row['beam']} batch {row['batch_size']}"
            speedups[key] = row["speedup_vs_fairseq_teacher"]
    results["speedups_vs_fairseq_teacher"] = speedups
    results["target"] = f"stu1 fairseq >= {TARGET_STU1_SPEEDUP}x the teacher"
    return results


def kd_data(args, logs: Path) -> dict:
    status = benchmark("kd_data_speed.py", args, logs, "kd_data_speed",
                       "--limit", "48" if args.dry_run else "512")
    if status["ok"]:
        status["summary"] = {row["engine"]: row.get("speed_vs_fairseq", row.get("error"))
                             for row in status["results"]["rows"]}
    return status


def write_report(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results directory (gpu_check.json, the "
                        "benchmarks' JSON, logs.tar.gz)")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "gpu-check",
                        help="scratch directory: assets, smoke runs (default work/gpu-check)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="no part starts after this many seconds (default 480)")
    parser.add_argument("--part-timeout-s", type=float, default=300,
                        help="time limit of each child process (default 300)")
    parser.add_argument("--teacher-updates", type=int, default=40)
    parser.add_argument("--phase1-updates", type=int, default=50)
    parser.add_argument("--smoke-runs", type=int, default=1,
                        help="fp16 smoke runs side by side (default 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, toy sizes: checks the scripts, measures nothing")
    parser.add_argument("--build-assets", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_assets is not None:
        return build_assets(args.build_assets)
    if args.out is None:
        parser.error("--out DIR is required")
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"check": "gpu_check", "dry_run": args.dry_run, "parts": {},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(sys.argv)}
    steps = {"environment": lambda: environment(args.dry_run),
             "smoke": lambda: smoke(args, args.work, logs),
             "phase1": lambda: phase1(args, logs),
             "decoding": lambda: decoding(args, logs),
             "kd_data": lambda: kd_data(args, logs)}
    for part in parts:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            report["parts"][part] = {"ok": False, "skipped": f"budget spent ({elapsed:.0f} s)"}
            continue
        print(f"[gpu-check] {part} (at {elapsed:.0f} s)", flush=True)
        part_start = time.perf_counter()
        try:
            result = steps[part]()
        except Exception as error:  # noqa: BLE001  (reported; the other parts still run)
            result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        report["parts"][part] = result
        result.setdefault("ok", all(r.get("ok", True) for r in result.values()
                                    if isinstance(r, dict)))
        result["part_seconds"] = round(time.perf_counter() - part_start, 1)
        write_report(args.out / "gpu_check.json", report)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    write_report(args.out / "gpu_check.json", report)
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    brief = summary(report)
    print(json.dumps(brief, indent=1), flush=True)
    return 1 if brief["failed"] else 0


def summary(report: dict) -> dict:
    """The lines worth reading at the end of the output."""
    parts = report["parts"]
    out = {"total_seconds": report.get("total_seconds")}
    env = parts.get("environment", {})
    out["gpu"] = env.get("gpu")
    out["torch"] = f"{env.get('torch')} (CUDA {env.get('torch_cuda')})"
    smoke_part = parts.get("smoke", {})
    out["smoke"] = {p: (s.get("ok"), [(r.get("updates"), r.get("overflow_skips"),
                                       round(r.get("last_loss", float("nan")), 3))
                                      for r in s.get("runs", [])])
                    for p, s in smoke_part.items() if isinstance(s, dict) and "exit" in s}
    out["phase1"] = parts.get("phase1", {}).get("summary", parts.get("phase1", {}).get("log_tail"))
    decoding_part = parts.get("decoding", {})
    out["decoding"] = decoding_part.get("speedups_vs_fairseq_teacher")
    out["kd_data"] = parts.get("kd_data", {}).get("summary")
    out["failed"] = [p for p, s in parts.items() if isinstance(s, dict) and s.get("ok") is False]
    return out


if __name__ == "__main__":
    sys.exit(main())
