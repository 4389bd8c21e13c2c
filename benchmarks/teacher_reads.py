"""How often each tool reads the teacher file: ``torch.load`` calls of that file, and the
bytes the process read (``/proc/self/io`` rchar) while the tool ran, relative to the
file's size.

Each tool runs in this process through its console script's ``cli_main`` (the same
argv as on the command line), after everything it imports is imported, so rchar counts
the tool's own reads: the teacher (every load; ``wd-kd-data`` also hashes it once to
know it on a resume), the data-bin, the dictionaries, and what CTranslate2 writes and
reads back of its conversion.

    python benchmarks/teacher_reads.py --teacher-path TEACHER.pt --data DATA-BIN \\
        [--output results.json]

Run it on two checkouts (``PYTHONPATH=OTHER_CHECKOUT``) to compare their code.
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import torch


def read_bytes() -> dict:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}


@contextlib.contextmanager
def counted_loads(path: str):
    """The ``torch.load`` calls of ``path`` made inside the block."""
    real, calls = torch.load, []

    def load(f, *args, **kwargs):
        if os.path.realpath(str(getattr(f, "name", f))) == os.path.realpath(path):
            calls.append(1)
        return real(f, *args, **kwargs)

    with mock.patch.object(torch, "load", load):
        yield calls


def run_tool(main, argv) -> None:
    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{argv}: exit {e.code}") from e


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-path", required=True)
    parser.add_argument("--data", required=True, help="the teacher's data-bin (train split)")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import ctranslate2.converters  # noqa: F401  (imported before the counts start)

    from wd_fairseq import export_ctranslate2, init_student, kd_data

    size = os.path.getsize(args.teacher_path)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        tools = {
            "wd-kd-data --engine ctranslate2": (kd_data.cli_main, ["DATA", "--engine", "ctranslate2"]),
            "wd-kd-data --engine fairseq": (kd_data.cli_main, ["DATA", "--engine", "fairseq"]),
            "wd-export-ct2": (export_ctranslate2.cli_main, [args.teacher_path, "OUT", "--data", "DATA"]),
            "wd-init-student": (init_student.cli_main, [args.teacher_path, "OUT.pt", "--data", "DATA",
                                                        "--decoder-layers", "1"]),
        }
        for i, (name, (tool, template)) in enumerate(tools.items()):
            data = shutil.copytree(args.data, os.path.join(work, f"data{i}"))
            out = os.path.join(work, f"out{i}")
            argv = [a.replace("DATA", data).replace("OUT", out) for a in template]
            if name.startswith("wd-kd-data"):
                argv += ["--teacher-path", args.teacher_path, "--cpu", "--threads", "1",
                         "--beam", "1", "--max-len-b", "10"]
            before = read_bytes()
            with counted_loads(args.teacher_path) as loads:
                run_tool(tool, argv)
            after = read_bytes()
            rchar = after["rchar"] - before["rchar"]
            rows.append({"tool": name, "teacher_loads": len(loads), "rchar_MB": round(rchar / 2**20, 1),
                         "rchar_per_teacher_size": round(rchar / size, 2),
                         "read_bytes_MB": round((after["read_bytes"] - before["read_bytes"]) / 2**20, 1)})
    print(f"teacher {args.teacher_path}: {size / 2**20:.1f} MiB")
    print("| tool | torch.load of the teacher | bytes read (rchar) | / teacher size |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tool']} | {row['teacher_loads']} | {row['rchar_MB']} MiB | "
              f"{row['rchar_per_teacher_size']}x |")
    if args.output:
        code = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                               "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        import wd_fairseq
        document = {"benchmark": "teacher_reads", "teacher_MiB": round(size / 2**20, 1),
                    "rows": rows, "command": " ".join(["python", "benchmarks/teacher_reads.py"] + sys.argv[1:]),
                    "wd_fairseq": os.path.dirname(wd_fairseq.__file__), "checkout_head": code,
                    "machine_load": os.getloadavg()}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)


if __name__ == "__main__":
    main()
