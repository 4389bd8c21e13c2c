"""How long the test suite takes: ``bash tests/run.sh --durations=0`` timed from here, with
the CPU time of everything it ran, the machine's load before and after, the time of each
test file (the sum of its tests' set-up, call and tear-down; the workers run files side
by side) and the slowest tests.

    python benchmarks/suite_time.py --output benchmarks/results/cpu/test_suite-amd.json

Run it on an otherwise idle machine: the suite uses every core.
"""

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DURATION = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(tests/[^:]+)::(.+)$")
SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed).*?) in [\d.]+s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("pytest_args", nargs="*", help="more arguments for tests/run.sh")
    args = parser.parse_args()
    command = ["bash", "tests/run.sh", "-p", "no:cacheprovider", "--durations=0", *args.pytest_args]
    load_before, start = os.getloadavg(), time.time()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall, load_after = time.time() - start, os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    files, tests = defaultdict(float), defaultdict(float)
    summary = None
    for line in proc.stdout.splitlines():
        if m := DURATION.match(line):
            seconds, _, path, name = float(m.group(1)), *m.group(2, 3, 4)
            files[path] += seconds
            tests[f"{path}::{name}"] += seconds
        elif m := SUMMARY.match(line):
            summary = m.group(1)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    result = {
        "benchmark": "suite_time", "command": shlex.join(["python", *sys.argv]), "suite_command": shlex.join(command),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "code": head.stdout.strip(),
        "cpu": cpu, "cpus": os.cpu_count(), "exit_status": proc.returncode, "summary": summary,
        "wall_s": round(wall, 1), "cpu_user_s": round(usage.ru_utime, 1), "cpu_system_s": round(usage.ru_stime, 1),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "files_s": {path: round(s, 1) for path, s in sorted(files.items(), key=lambda kv: -kv[1])},
        "slowest_tests_s": {name: round(s, 1) for name, s in sorted(tests.items(), key=lambda kv: -kv[1])[:15]},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    print(json.dumps({k: result[k] for k in ("summary", "wall_s", "cpu_user_s", "cpu_system_s", "load_before")}))
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
