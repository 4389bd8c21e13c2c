"""``wd-distill plan --probe``: time per stage, estimated from a short measured probe:
``wd-kd-data --limit`` on the first sentences (the teacher's decoding rate) and a few
updates of each training command of the run (their time per update), scaled to the
stages. Runs in a temporary directory beside the work directory, removed afterwards."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Dict, List

from .distill_data import link_data
from .stages import Command, Stage
from .teacher import WDSetupError

PROBE_SENTENCES = 64
PROBE_UPDATES = 6


def _sentences(data_bin: str, split: str, lang_pair: str, lang: str) -> int:
    """Sentences of a binarised split (its index file's count)."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(os.path.join(data_bin, f"{split}.{lang_pair}.{lang}"), None)
    return len(dataset)


def _run(argv: List[str], log: str) -> float:
    start = time.time()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log, encoding="utf-8") as f:
            tail = f.read()[-2000:]
        raise WDSetupError(f"--probe: `{' '.join(map(str, argv))[:200]}` failed (exit {code}):\n{tail}")
    return time.time() - start


def _replace(argv: List[str], flag: str, value: str) -> List[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def probe(job, checked, stages: List[Stage]) -> Dict[str, str]:
    """Estimated time of each stage (text), measured on this machine now."""
    if job.raw_dir and not os.path.isdir(job.data_bin):
        raise WDSetupError("--probe with --raw-dir needs the data-bin first. Fix: wd-distill run "
                           "... --until prepare, then plan --probe")
    train = sum(_sentences(job.data_bin, "train", f"{s}-{t}", s) for s, t in checked.directions)
    test = sum(_sentences(job.data_bin, job.test_split, f"{s}-{t}", s) for s, t in checked.directions)
    parent = os.path.dirname(job.path())
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".wd-distill-probe-", dir=parent)
    try:
        kd_bin = os.path.join(scratch, "data-bin-kd")
        link_data(job.data_bin, kd_bin)
        kd = next(a for s in stages if s.name == "kd_data" for a in s.actions if isinstance(a, Command))
        argv = [kd_bin if a == job.path("data-bin-kd") else a for a in kd.argv]
        _run(argv + ["--limit", str(PROBE_SENTENCES)], os.path.join(scratch, "kd.log"))
        with open(os.path.join(kd_bin, "kd-train1", "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        rate = summary["decoded_this_run"] / max(summary["decode_seconds"], 1e-6)
        estimates = {"kd_data": train / rate, "evaluate": 2 * test / rate}
        for stage in stages:
            for action in stage.actions:
                if isinstance(action, Command) and action.argv[0] == "fairseq-train":
                    estimates[stage.name] = estimates.get(stage.name, 0) + _train_seconds(
                        action.argv, job, kd_bin, os.path.join(scratch, stage.name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: _clock(seconds) for name, seconds in estimates.items()}


def _train_seconds(argv: List[str], job, kd_bin: str, save_dir: str) -> float:
    """The time of a training command's updates, from PROBE_UPDATES of them (no saves)."""
    updates = int(argv[argv.index("--max-update") + 1])
    argv = [kd_bin if a == job.path("data-bin-kd") else a for a in argv]
    if "--finetune-from-model" in argv:  # the same network from scratch: the same cost per update
        at = argv.index("--finetune-from-model")
        argv = argv[:at] + argv[at + 2:]
    argv = _replace(_replace(argv, "--max-update", str(PROBE_UPDATES)), "--save-dir", save_dir)
    log = save_dir + ".log"
    _run(argv + ["--no-save", "--disable-validation"], log)
    with open(log, encoding="utf-8") as f:
        done = re.search(r"done training in ([\d.]+) seconds", f.read())
    return float(done.group(1)) / PROBE_UPDATES * updates if done else 0.0


def _clock(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
