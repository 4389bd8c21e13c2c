"""Helpers of fp16_smoke.sh: a toy parallel corpus, and the check of a training run.

    python fp16_smoke_tools.py corpus RAW_DIR
    python fp16_smoke_tools.py check-log LOG --updates N [--precision P]

check-log prints one JSON line: updates made, first and last loss, and the number of
updates that loss scaling skipped (gradient overflow).
"""

import argparse
import json
import math
import random
import re
import sys
from pathlib import Path


def write_corpus(raw: Path, seed: int = 1) -> None:
    """train/valid/test.{src,tgt}: random words, target = word map + reversed order."""
    rng = random.Random(seed)
    words = [f"s{i}" for i in range(40)]
    mapping = dict(zip(words, rng.sample([f"t{i}" for i in range(40)], 40)))
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 2000), ("valid", 100), ("test", 100)):
        src = [[rng.choice(words) for _ in range(rng.randint(3, 12))] for _ in range(n)]
        (raw / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in src))
        (raw / f"{split}.tgt").write_text(
            "".join(" ".join(mapping[w] for w in reversed(s)) + "\n" for s in src))


def training_stats(log: str):
    """The JSON stats fairseq-train logs (--log-format json) for train_inner and train."""
    for line in log.splitlines():
        found = re.search(r"\| (train_inner|train) \| (\{.*\})\s*$", line)
        if found:
            yield found.group(1), json.loads(found.group(2))


#: Precisions whose runs log fairseq's loss scale (fp16 optimiser, amp's grad scaler).
#: A checkpoint cannot tell: fairseq casts fp16 weights to fp32 when it saves.
LOSS_SCALED = {"fp16", "amp"}


def check_log(path: Path, updates: int, precision: str = "fp32") -> dict:
    """Raise SystemExit unless the run did ``updates`` updates with finite losses in
    ``precision``; return its summary."""
    text = path.read_text(errors="replace")
    stats = list(training_stats(text))
    if not stats:
        sys.exit(f"{path}: no training statistics found (did fairseq-train run?)")
    losses = [float(s["loss"]) for _, s in stats if "loss" in s]
    if not losses or not all(math.isfinite(x) for x in losses):
        sys.exit(f"{path}: non-finite or missing loss: {losses}")
    done = max(int(s.get("num_updates", 0)) for _, s in stats)
    if done < updates:
        sys.exit(f"{path}: only {done} of {updates} updates were made")
    if precision in LOSS_SCALED and not any("loss_scale" in s for _, s in stats):
        sys.exit(f"{path}: no loss_scale in the log: the run was not in {precision}")
    summary = {"log": path.name, "precision": precision, "updates": done,
               "first_loss": losses[0], "last_loss": losses[-1],
               "overflow_skips": text.count("gradient overflow detected")}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("corpus").add_argument("raw", type=Path)
    check = sub.add_parser("check-log")
    check.add_argument("log", type=Path)
    check.add_argument("--updates", type=int, required=True)
    check.add_argument("--precision", choices=("fp32", "fp16", "amp"), default="fp32")
    args = parser.parse_args(argv)
    if args.command == "corpus":
        write_corpus(args.raw)
    else:
        print(json.dumps(check_log(args.log, args.updates, args.precision)))


if __name__ == "__main__":
    main()
