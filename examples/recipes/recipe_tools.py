#!/usr/bin/env python3
"""Small helpers of ``pipeline.sh`` (text preparation and checkpoints).

    recipe_tools.py tokenize --lang L --mode {moses,none} IN OUT
    recipe_tools.py clean --src S --tgt T --out-prefix P --src-lang A --tgt-lang B [--max-len 250 --ratio 1.5]
    recipe_tools.py average --out OUT.pt CKPT...
    recipe_tools.py phase2-flags STUDENT.pt

Every output is written to a temporary file and renamed, so an interrupted stage
never leaves a truncated file that a rerun would take as done.
"""

import argparse
import os
import sys
from multiprocessing import Pool
from typing import Iterator


def _replace_into(path: str, lines) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def _lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def _count(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


_TOKENIZER = None


def _moses_line(args) -> str:
    """Normalise punctuation, then Moses-tokenize with aggressive dash splitting (``@-@``)."""
    global _TOKENIZER
    lang, line = args
    if _TOKENIZER is None:
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        _TOKENIZER = (MosesPunctNormalizer(lang), MosesTokenizer(lang))
    normalizer, tokenizer = _TOKENIZER
    return tokenizer.tokenize(normalizer.normalize(line), escape=False,
                              aggressive_dash_splits=True, return_str=True)


def tokenize(args) -> None:
    """``moses``: sacremoses normalisation + tokenization; ``none``: text that is already
    segmented (e.g. Chinese word-segmented with spaces): only whitespace is collapsed."""
    if args.mode == "none":
        _replace_into(args.output, (" ".join(line.split()) for line in _lines(args.input)))
        return
    with Pool(args.workers) as pool:
        jobs = ((args.lang, line) for line in _lines(args.input))
        _replace_into(args.output, pool.imap(_moses_line, jobs, chunksize=1000))


def clean(args) -> None:
    """Drop training pairs that are empty, longer than --max-len tokens, or whose
    length ratio exceeds --ratio (Moses clean-corpus-n rules)."""
    n_src, n_tgt = _count(args.src), _count(args.tgt)
    if n_src != n_tgt:
        sys.exit(f"clean: {args.src} has {n_src} lines but {args.tgt} has {n_tgt}. "
                 "Fix: the two sides of a parallel corpus must be line-aligned")
    outputs = [f"{args.out_prefix}.{args.src_lang}", f"{args.out_prefix}.{args.tgt_lang}"]
    kept = 0
    with open(outputs[0] + ".tmp", "w", encoding="utf-8") as f_src, \
            open(outputs[1] + ".tmp", "w", encoding="utf-8") as f_tgt:
        for s, t in zip(_lines(args.src), _lines(args.tgt)):
            ns, nt = len(s.split()), len(t.split())
            if (1 <= ns <= args.max_len and 1 <= nt <= args.max_len
                    and max(ns, nt) <= args.ratio * min(ns, nt)):
                f_src.write(s + "\n")
                f_tgt.write(t + "\n")
                kept += 1
    for path in outputs:
        os.replace(path + ".tmp", path)
    print(f"clean: kept {kept} of {n_src} pairs")


def average(args) -> None:
    """Average the model tensors of checkpoints (the config etc. of the last one)."""
    import torch

    import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
    from wd_fairseq.materialize import save_atomic

    total = None
    for path in args.checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = {k: v.double() if v.is_floating_point() else v for k, v in state["model"].items()}
        if total is None:
            total = model
        else:
            if model.keys() != total.keys():
                sys.exit(f"average: {path} has other tensors than {args.checkpoints[0]}. "
                         "Fix: average checkpoints of one training run")
            for k, v in model.items():
                if v.is_floating_point():
                    total[k] += v
    dtypes = {k: v.dtype for k, v in state["model"].items()}
    state["model"] = {
        k: (v / len(args.checkpoints)).to(dtypes[k]) if v.is_floating_point() else v
        for k, v in total.items()
    }
    save_atomic(state, args.out)
    print(f"average: wrote {args.out} from {len(args.checkpoints)} checkpoints")


def phase2_flags(args) -> None:
    """The ``fairseq-train`` flags that rebuild a materialised student."""
    import torch

    from wd_fairseq.materialize import phase2_flags as flags

    state = torch.load(args.student, map_location="cpu", weights_only=True)
    print(" ".join(flags(state["cfg"]["model"])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenize")
    p.add_argument("--lang", required=True)
    p.add_argument("--mode", choices=("moses", "none"), default="moses")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(run=tokenize)
    p = sub.add_parser("clean")
    for name in ("--src", "--tgt", "--out-prefix", "--src-lang", "--tgt-lang"):
        p.add_argument(name, required=True)
    p.add_argument("--max-len", type=int, default=250)
    p.add_argument("--ratio", type=float, default=1.5)
    p.set_defaults(run=clean)
    p = sub.add_parser("average")
    p.add_argument("--out", required=True)
    p.add_argument("checkpoints", nargs="+")
    p.set_defaults(run=average)
    p = sub.add_parser("phase2-flags")
    p.add_argument("student")
    p.set_defaults(run=phase2_flags)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
