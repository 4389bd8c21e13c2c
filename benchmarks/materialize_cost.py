"""Q4: ``wd-materialize`` time and memory for a teacher of the authors' size.

The command runs as users run it, on the phase-1 checkpoints of stu1 and stu2
(generated from the 6+6 x 512 / 2048 teacher with a 32k vocabulary); wall time, CPU
time and peak RSS of that process are measured, next to the same numbers for an
interpreter that only imports the tool (start-up). The same steps are then timed in
process to show where the time goes: loading the phase-1 checkpoint and building the
model, evaluating every generator once (fp32), and writing the student.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from wd_fairseq.checkpoints import save_atomic
from wd_fairseq.materialize import load_phase1, student_checkpoint

from common import (STUDENTS, assets_of, add_common_args, environment, mib, print_table,
                    run, use_threads, write_results)


def timed(fn):
    """(result, wall seconds) of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def in_process_steps(phase1: Path, out: Path) -> dict:
    """Wall seconds of materialize's three steps, called as the CLI calls them."""
    (model, task, state), load_s = timed(lambda: load_phase1(str(phase1)))
    with torch.no_grad():
        checkpoint, generate_s = timed(lambda: student_checkpoint(model, task, state))
    _, save_s = timed(lambda: save_atomic(checkpoint, str(out)))
    return {"load_s": load_s, "generate_s": generate_s, "save_s": save_s}


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--repeats", type=int,
                        help="CLI runs per student, fastest kept (default: 1 with --quick, else 3)")
    args = parser.parse_args()
    if args.device == "cuda":
        parser.error("--device cuda: wd-materialize evaluates the generators on the CPU (fp32)")
    env = use_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    assets = assets_of(args)
    teacher = assets.teacher()
    startup = min((run([sys.executable, "-c", "import wd_fairseq.materialize"], env=env)
                   for _ in range(repeats)), key=lambda r: r.seconds)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for student in STUDENTS:
            phase1, out = assets.phase1(student), Path(tmp) / f"{student}.pt"
            cli = min((run(["wd-materialize", phase1, out], env=env) for _ in range(repeats)),
                      key=lambda r: r.seconds)
            steps = in_process_steps(phase1, out)
            rows.append({
                "student": student, "teacher_MiB": mib(teacher), "phase1_MiB": mib(phase1),
                "student_MiB": mib(out), "cli_wall_s": cli.seconds, "cli_cpu_s": cli.cpu_seconds,
                "cli_peak_rss_MiB": cli.peak_rss_mib,
                "net_wall_s": cli.seconds - startup.seconds,
                "net_peak_rss_MiB": cli.peak_rss_mib - startup.peak_rss_mib,
                **steps,
            })
    results = {"benchmark": "materialize_cost", "mode": "quick" if args.quick else "full",
               "repeats": repeats, "environment": environment("cpu"),
               "startup": {"wall_s": startup.seconds, "cpu_s": startup.cpu_seconds,
                           "peak_rss_MiB": startup.peak_rss_mib},
               "rows": rows}
    path = write_results(args, "materialize_cost", results)
    print_table(rows, ["student", "phase1_MiB", "student_MiB", "cli_wall_s", "cli_cpu_s",
                       "cli_peak_rss_MiB", "net_wall_s", "net_peak_rss_MiB", "load_s",
                       "generate_s", "save_s"])
    print(f"\nstart-up alone (import): {startup.seconds:.1f} s wall, "
          f"{startup.peak_rss_mib:.0f} MiB peak RSS. Results: {path}")


if __name__ == "__main__":
    main()
