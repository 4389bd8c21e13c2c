"""Shared helpers of the benchmark scripts in this directory.

Assets of the authors' size are built once per work directory (default
``work/bench`` at the repository root) through the real command-line tools, and
reused by every script:

- ``data/``: a fake BPE vocabulary of 32,000 symbols (32,004 entries with fairseq's
  specials, separate source and target dictionaries as the authors') and random
  sentences of 10-40 tokens: ``train`` (512), ``valid`` (the quick test set, 48) and
  ``test`` (the full test set, 480);
- ``teacher.pt``: ``fairseq-train --arch transformer_wmt_en_de`` (6+6 layers x 512 /
  2048 / 8 heads, post-norm) after one update: random weights, real checkpoint;
- ``phase1-stuN.pt``: ``fairseq-train --arch wd_transformer_stuN`` after one update;
- ``stuN.pt``: ``wd-materialize`` of it; ``ct2-NAME-QUANT/``: ``wd-export-ct2`` of a
  stock checkpoint.

``--assets tiny`` builds the same files at toy size (default work directory
``work/bench-tiny``): a dry run of a script in seconds, whose numbers mean nothing.
"""

import argparse
import importlib.util
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
#: --user-dir: the wd_fairseq that this interpreter imports (the installed copy).
USER_DIR = Path(importlib.util.find_spec("wd_fairseq").origin).parent
BIN = Path(sys.executable).parent

STUDENTS = ("stu1", "stu2")


@dataclass(frozen=True)
class AssetSize:
    """Vocabulary, sentences per split, and the model flags of the teacher and of each
    phase-1 student."""

    vocab: int
    splits: Dict[str, int]
    teacher: List[str]
    students: Dict[str, List[str]]


ASSET_SIZES = {
    # The authors' teacher (6+6 x 512/2048/8) and students.
    "authors": AssetSize(
        vocab=32000, splits={"train": 2048, "valid": 48, "test": 480},
        teacher=["--arch", "transformer_wmt_en_de"],
        students={"stu1": ["--arch", "wd_transformer_stu1"],
                  "stu2": ["--arch", "wd_transformer_stu2"]}),
    # A dry run: the same files and code paths in seconds.
    "tiny": AssetSize(
        vocab=200, splits={"train": 64, "valid": 6, "test": 12},
        teacher=["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
                 "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
                 "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
                 "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
        students={student: ["--arch", "wd_transformer", "--decoder-layers", str(layers),
                            "--decoder-embed-dim", str(width),
                            "--decoder-ffn-embed-dim", str(2 * width),
                            "--decoder-attention-heads", "4"]
                  for student, layers, width in (("stu1", 1, 32), ("stu2", 1, 64))}),
}
#: One update of the authors' optimiser set-up: only the checkpoint format matters.
TRAIN_FLAGS = [
    "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "7e-4",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-7",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--max-tokens", "1024", "--max-update", "1", "--seed", "1", "--cpu",
    "--disable-validation", "--no-save-optimizer-state", "--no-epoch-checkpoints",
    "--no-progress-bar", "--num-workers", "0", "--data-buffer-size", "0",
    "--required-batch-size-multiple", "1",
]


class BenchmarkError(RuntimeError):
    """A benchmark cannot run: the message says which command or file, and the fix."""


@dataclass
class Run:
    """A finished command: wall and CPU seconds, peak resident memory (MiB), output."""

    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    stdout: str
    stderr: str


def run(cmd: Sequence, env: Optional[Dict[str, str]] = None) -> Run:
    """Run a command of this environment; measure its wall and CPU time and peak RSS
    (``wait4`` rusage of that child alone)."""
    cmd = [str(c) for c in cmd]
    if not os.path.isabs(cmd[0]) and (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    full_env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    full_env.update(env or {})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                     out.read(), err.read())
    if proc.returncode != 0:
        raise BenchmarkError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return result


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true",
                        help="smaller settings that finish in about 1-2 minutes on 2 CPU cores "
                        "(once the shared assets exist)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda (with fp16) when a GPU is visible, else cpu")
    parser.add_argument("--assets", choices=sorted(ASSET_SIZES), default="authors",
                        help="authors: the authors' model sizes (default); tiny: toy sizes "
                        "for a dry run of the script (its numbers mean nothing)")
    parser.add_argument("--workdir", type=Path,
                        help="where shared assets and results go (default: work/bench, "
                        "work/bench-tiny with --assets tiny)")
    parser.add_argument("--output", type=Path,
                        help="JSON results (default: WORKDIR/results/NAME[-quick].json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (default 1: on a shared or busy "
                        "machine more threads make timings erratic)")
    return parser


def assets_of(args) -> "Assets":
    """The shared assets that ``args`` (see :func:`add_common_args`) ask for; fills in
    ``args.workdir``."""
    if args.workdir is None:
        args.workdir = REPO / "work" / ("bench" if args.assets == "authors" else "bench-tiny")
    return Assets(args.workdir, args.assets)


def use_threads(threads: int) -> Dict[str, str]:
    """Set this process's torch threads; return the environment for child processes."""
    import torch

    torch.set_num_threads(threads)
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: torch sees no GPU. Fix: use --device cpu")
    return name


def fairseq_device_flags(device: str) -> List[str]:
    """CPU runs fp32 (``--cpu``); a GPU runs fp16 (``--fp16``)."""
    return ["--cpu"] if device == "cpu" else ["--fp16"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def environment(device: str) -> dict:
    """What the numbers depend on."""
    import fairseq
    import torch

    info = {
        "device": device,
        "precision": "fp32" if device == "cpu" else "fp16",
        "torch": torch.__version__,
        "fairseq": fairseq.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "load_average_1min_at_start": os.getloadavg()[0],
        # glibc's allocator settings: on some VMs page faults of fresh big tensors cost
        # seconds per update (benchmarks/README.md)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _code_version() -> str:
    """The commit of the wd_fairseq that ran (``+dirty`` with uncommitted changes)."""
    import wd_fairseq

    where = Path(wd_fairseq.__file__).parent
    git = ["git", "-C", str(where)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return f"wd_fairseq from {where} (not a git checkout)"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout
    return f"wd_fairseq at {head.stdout.strip()}{'+dirty' if dirty.strip() else ''} ({where})"


def write_results(args, name: str, results: dict) -> Path:
    """Write ``results`` as JSON (atomically), with the command, date and code that made
    them, and return the path."""
    path = args.output or args.workdir / "results" / f"{name}{'-quick' if args.quick else ''}.json"
    from wd_fairseq.files import atomic_writer  # (imports fairseq: only once a benchmark ran)

    results.setdefault("command", shlex.join(["python", *sys.argv]))
    results.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    results.setdefault("code", _code_version())

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(str(path)) as f:
        json.dump(results, f, indent=2, sort_keys=False)
    return Path(path)


def print_table(rows: List[dict], columns: List[str]) -> None:
    """A Markdown table of ``rows`` (floats with 3 significant decimals)."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


def mib(path: Path) -> float:
    """Size of a file, or of all files under a directory, in MiB."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    return path.stat().st_size / 2**20


class Assets:
    """Builds (once, atomically) and returns the shared assets of ``workdir``, at the
    size ``ASSET_SIZES[size]``."""

    def __init__(self, workdir: Path, size: str = "authors"):
        self.root = Path(workdir)
        self.size = ASSET_SIZES[size]
        self.root.mkdir(parents=True, exist_ok=True)
        marker, spec = self.root / "asset-size.json", json.dumps(
            {"size": size, **self.size.__dict__}, sort_keys=True)
        if not marker.exists():
            marker.write_text(spec + "\n")
        elif marker.read_text().strip() != spec:
            raise BenchmarkError(
                f"{self.root} holds assets built with other settings ({marker}). Fix: pass "
                "another --workdir (or the matching --assets), or delete that directory")

    def student_flags(self, student: str) -> List[str]:
        """The phase-1 model flags of ``student`` (``stu1`` or ``stu2``)."""
        return self.size.students[student]

    def _log(self, what: str) -> None:
        print(f"[assets] building {what} (once; reused from {self.root})", flush=True)

    def data(self) -> Path:
        """The data-bin: 32k-symbol dictionaries, random sentences."""
        dest = self.root / "data"
        if dest.is_dir():
            return dest
        vocab = self.size.vocab
        self._log(f"data-bin with a {vocab}-symbol vocabulary")
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            tmp = Path(tmp)
            words = [f"w{i}" for i in range(vocab)]
            (tmp / "dict.txt").write_text("".join(f"{w} {vocab - i}\n" for i, w in enumerate(words)))
            rng = random.Random(1)
            for split, n in self.size.splits.items():
                for lang in ("src", "tgt"):
                    lines = (" ".join(rng.choices(words, k=rng.randint(10, 40))) for _ in range(n))
                    (tmp / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
            run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
                 "--trainpref", tmp / "train", "--validpref", tmp / "valid",
                 "--testpref", tmp / "test", "--srcdict", tmp / "dict.txt",
                 "--tgtdict", tmp / "dict.txt", "--destdir", tmp / "bin", "--workers", "1"])
            os.replace(tmp / "bin", dest)
        return dest

    def _train(self, name: str, *flags) -> Path:
        """One ``fairseq-train`` update; keep its checkpoint as ``name``."""
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            run(["fairseq-train", self.data(), *flags, *TRAIN_FLAGS, "--save-dir", tmp])
            os.replace(Path(tmp) / "checkpoint_last.pt", self.root / name)
        return self.root / name

    def teacher(self) -> Path:
        path = self.root / "teacher.pt"
        if not path.exists():
            self._log(f"the teacher ({' '.join(self.size.teacher)}, random weights)")
            self._train(path.name, *self.size.teacher)
        return path

    def phase1(self, student: str) -> Path:
        path = self.root / f"phase1-{student}.pt"
        if not path.exists():
            teacher = self.teacher()
            flags = self.student_flags(student)
            self._log(f"the phase-1 WD model {' '.join(flags)}")
            self._train(path.name, "--user-dir", USER_DIR, *flags, "--teacher-path", teacher)
        return path

    def student(self, student: str) -> Path:
        path = self.root / f"{student}.pt"
        if not path.exists():
            phase1 = self.phase1(student)
            self._log(f"the materialised {student}")
            run(["wd-materialize", phase1, path])  # writes atomically
        return path

    def stock(self, name: str) -> Path:
        """``teacher`` or a materialised student."""
        return self.teacher() if name == "teacher" else self.student(name)

    def ct2(self, name: str, quantization: str) -> Path:
        path = self.root / f"ct2-{name}-{quantization}"
        if not path.exists():
            checkpoint = self.stock(name)
            self._log(f"the CTranslate2 export of {name} ({quantization})")
            run(["wd-export-ct2", checkpoint, path, "--quantization", quantization,
                 "--data", self.data()])  # writes atomically
        return path


def read_split(data_dir: Path, split: str, lang: str) -> List[List[str]]:
    """Token lists of a binarised split, in corpus order (for CTranslate2)."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(data_dir / f"dict.{lang}.txt"))
    dataset = data_utils.load_indexed_dataset(
        str(data_dir / f"{split}.src-tgt.{lang}"), dictionary, "mmap"
    )
    return [dictionary.string(dataset[i]).split() for i in range(len(dataset))]


def generation_seconds(log: str) -> Dict[str, float]:
    """Parse fairseq-generate's ``Translated N sentences (T tokens) in Xs (S
    sentences/s, R tokens/s)`` line; seconds from T / R (X has one decimal)."""
    for line in log.splitlines():
        if "fairseq_cli.generate" in line and "Translated" in line:
            words = line.split("Translated", 1)[1].replace("(", " ").replace(",", "").split()
            tokens, rate = int(words[2]), float(words[8])
            return {"sentences": int(words[0]), "tokens": tokens,
                    "seconds": tokens / rate if rate > 0 else float(words[5].rstrip("s"))}
    raise BenchmarkError("fairseq-generate printed no 'Translated ...' line:\n" + log[-3000:])

