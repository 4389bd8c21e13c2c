#!/usr/bin/env python3
"""Small helpers of ``pipeline.sh`` (text preparation and checkpoints).

    recipe_tools.py concat --src-lang A --tgt-lang B --out-prefix P PREFIX...
    recipe_tools.py tokenize --lang L --mode {moses,none} [--remove-diacritics] IN OUT
    recipe_tools.py check-aligned SRC TGT
    recipe_tools.py clean --src S --tgt T --out-prefix P --src-lang A --tgt-lang B [--max-len 250 --ratio 1.5]
    recipe_tools.py gpus
    recipe_tools.py batch --visible N --cpu 0 --num-gpus N --max-tokens T --update-freq F --batch-tokens B
    recipe_tools.py review [--data DATA_BIN] < KEY=VALUE lines (pipeline.sh's settings)
    recipe_tools.py average --dir DIR --rule {epochs,updates} --last N --out OUT.pt

Text: ``\n`` is the only line end. Raw WMT text holds bare ``\r``, ``\x85``, ``\u2028``
and form feeds inside lines; Python's default text mode (and ``str.splitlines``) would
split there, misaligning the two sides of a corpus. Files are read with ``newline="\n"``,
a last line without ``\n`` counts, and tokenized output has every such character turned
into a space, so the tools after it (subword-nmt, fairseq-preprocess) see the same lines.

Every output is written to a temporary file and renamed, so an interrupted stage
never leaves a truncated file that a rerun would take as done.
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from multiprocessing import Pool
from typing import Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_wd_module(name: str):
    """A standard-library-only module of wd_fairseq, without importing fairseq."""
    path = os.path.join(HERE, os.pardir, os.pardir, "wd_fairseq", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"wd_fairseq_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


normalize_romanian = _load_wd_module("romanian").normalize_romanian
_files = _load_wd_module("files")
atomic_writer, write_atomic = _files.atomic_writer, _files.write_atomic  # (and bible_es_en's tools)
sha256_file = _files.sha256_file  # (bible_es_en's study)


def _replace_into(path: str, lines) -> None:
    with atomic_writer(path) as f:
        for line in lines:
            f.write(line + "\n")


def _lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 file, split on ``\n`` only (a missing final ``\n`` is fine)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            yield line[:-1] if line.endswith("\n") else line


def _count(path: str) -> int:
    return sum(1 for _ in _lines(path))


def _one_line(text: str) -> str:
    """Whitespace runs (including ``\r``, ``\x85``, ``\u2028``, form feeds) -> one space."""
    return " ".join(text.split())


_TOKENIZER = None


def _moses_line(args) -> str:
    """Normalise punctuation, then Moses-tokenize with aggressive dash splitting (``@-@``)."""
    global _TOKENIZER
    lang, remove_diacritics, line = args
    if _TOKENIZER is None:
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        _TOKENIZER = (MosesPunctNormalizer(lang), MosesTokenizer(lang))
    normalizer, tokenizer = _TOKENIZER
    line = normalizer.normalize(_one_line(line))
    if lang == "ro":
        line = normalize_romanian(line, remove_diacritics)
    return _one_line(tokenizer.tokenize(line, escape=False, aggressive_dash_splits=True,
                                        return_str=True))


def _plain_line(args) -> str:
    lang, remove_diacritics, line = args
    line = _one_line(line)
    return normalize_romanian(line, remove_diacritics) if lang == "ro" else line


def tokenize(args) -> None:
    """``moses``: sacremoses normalisation + tokenization; ``none``: text that is already
    segmented (e.g. Chinese word-segmented with spaces): only whitespace is collapsed.
    Romanian (``--lang ro``) also gets ş ţ -> ș ț, and ``--remove-diacritics``."""
    jobs = ((args.lang, args.remove_diacritics, line) for line in _lines(args.input))
    if args.mode == "none":
        _replace_into(args.output, map(_plain_line, jobs))
        return
    with Pool(args.workers) as pool:
        _replace_into(args.output, pool.imap(_moses_line, jobs, chunksize=1000))


def concat(args) -> None:
    """Concatenate the parallel files PREFIX.SRC / PREFIX.TGT of every prefix into
    OUT_PREFIX.SRC / OUT_PREFIX.TGT, checking that each pair is line-aligned."""
    langs = (args.src_lang, args.tgt_lang)
    for prefix in args.prefixes:
        for lang in langs:
            if not os.path.isfile(f"{prefix}.{lang}"):
                sys.exit(f"concat: {prefix}.{lang}: not in the downloads. Fix: correct TRAIN_PREFIXES")
        counts = [_count(f"{prefix}.{lang}") for lang in langs]
        if counts[0] != counts[1]:
            sys.exit(f"concat: {prefix}.{{{','.join(langs)}}}: {counts[0]} and {counts[1]} lines "
                     "(split on \\n only). Fix: check the download (TRAIN_PREFIXES)")
    for lang in langs:
        _replace_into(f"{args.out_prefix}.{lang}",
                      (line for prefix in args.prefixes for line in _lines(f"{prefix}.{lang}")))


def check_aligned(args) -> None:
    """Refuse two files of a parallel set whose line counts differ."""
    n_src, n_tgt = _count(args.src), _count(args.tgt)
    if n_src != n_tgt:
        sys.exit(f"check-aligned: {args.src} has {n_src} lines but {args.tgt} has {n_tgt}. "
                 "Fix: the raw files of a set must be line-aligned")


#: Share of pairs the length-ratio rule may drop before ``clean`` warns.
RATIO_WARNING = 0.05


def clean(args) -> None:
    """Drop training pairs that are empty, longer than --max-len tokens, or whose
    length ratio exceeds --ratio (Moses clean-corpus-n rules); report what each rule
    dropped, and warn when the ratio rule drops more than RATIO_WARNING of the pairs
    (a ratio too tight for the pair's segmentation, e.g. word-segmented Chinese)."""
    n_src, n_tgt = _count(args.src), _count(args.tgt)
    if n_src != n_tgt:
        sys.exit(f"clean: {args.src} has {n_src} lines but {args.tgt} has {n_tgt}. "
                 "Fix: the two sides of a parallel corpus must be line-aligned")
    outputs = [f"{args.out_prefix}.{args.src_lang}", f"{args.out_prefix}.{args.tgt_lang}"]
    dropped = {"empty": 0, "length": 0, "ratio": 0}
    kept = 0
    with atomic_writer(outputs[0]) as f_src, atomic_writer(outputs[1]) as f_tgt:
        for s, t in zip(_lines(args.src), _lines(args.tgt)):
            ns, nt = len(s.split()), len(t.split())
            if min(ns, nt) < 1:
                dropped["empty"] += 1
            elif max(ns, nt) > args.max_len:
                dropped["length"] += 1
            elif max(ns, nt) > args.ratio * min(ns, nt):
                dropped["ratio"] += 1
            else:
                f_src.write(s + "\n")
                f_tgt.write(t + "\n")
                kept += 1
    print(f"clean: kept {kept} of {n_src} pairs; dropped {dropped['empty']} with an empty "
          f"side, {dropped['length']} longer than {args.max_len} tokens, {dropped['ratio']} "
          f"with a length ratio above {args.ratio}")
    if n_src and dropped["ratio"] > RATIO_WARNING * n_src:
        print(f"clean: WARNING: the length-ratio rule dropped {dropped['ratio'] / n_src:.1%} of "
              f"the pairs of {args.src}. Fix: if the two sides are segmented differently (e.g. "
              "word-segmented Chinese), raise CLEAN_RATIO")


_EPOCH_SAVE = re.compile(r"^checkpoint(\d+)\.pt$")
_INTERVAL_SAVE = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")


def checkpoints_to_average(directory: str, rule: str, last: int) -> List[str]:
    """The checkpoints of a fairseq save dir that ``rule`` averages, oldest first.

    ``epochs``: the last ``last`` epoch-end saves (checkpointN.pt, by N), the authors'
    rule for the teacher. ``updates``: the last ``last`` saves of any kind in the order
    they were written (checkpoint_E_U.pt every --save-interval-updates; fairseq names a
    save that falls on an epoch end checkpointE.pt).
    """
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if rule == "epochs":
        saves = sorted((int(m.group(1)), n) for n in names if (m := _EPOCH_SAVE.match(n)))
        chosen = [os.path.join(directory, n) for _, n in saves[-last:]]
    else:
        paths = [os.path.join(directory, n) for n in names
                 if _EPOCH_SAVE.match(n) or _INTERVAL_SAVE.match(n)]
        chosen = sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, p))[-last:]
    if len(chosen) < last:
        kind = "epoch-end checkpoints (checkpointN.pt)" if rule == "epochs" else "saved checkpoints"
        sys.exit(f"average: {directory}: {len(chosen)} {kind}, {last} to average (AVG_LAST). "
                 "Fix: train longer (rerun the stage with more updates), lower AVG_LAST, or "
                 "average by the other rule (TEACHER_AVERAGE / STUDENT_AVERAGE)")
    return chosen


def average_checkpoints(checkpoints: List[str], out: str) -> None:
    """Write to ``out`` (atomically) the mean of the model tensors of ``checkpoints``, with
    the config etc. of the last one."""
    import torch

    import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
    from wd_fairseq.checkpoints import save_atomic

    total = None
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = {k: v.double() if v.is_floating_point() else v for k, v in state["model"].items()}
        if total is None:
            total = model
        else:
            if model.keys() != total.keys():
                sys.exit(f"average: {path} has other tensors than {checkpoints[0]}. "
                         "Fix: average checkpoints of one training run")
            for k, v in model.items():
                if v.is_floating_point():
                    total[k] += v
    dtypes = {k: v.dtype for k, v in state["model"].items()}
    state["model"] = {
        k: (v / len(checkpoints)).to(dtypes[k]) if v.is_floating_point() else v
        for k, v in total.items()
    }
    save_atomic(state, out)


def average(args) -> None:
    checkpoints = checkpoints_to_average(args.dir, args.rule, args.last)
    average_checkpoints(checkpoints, args.out)
    names = ", ".join(os.path.basename(p) for p in checkpoints)
    print(f"average: wrote {args.out} from {len(checkpoints)} checkpoints ({args.rule}: {names})")


# -- GPUs and the batch -------------------------------------------------------------

def visible_gpus(listing: str, cuda_visible_devices: Optional[str]) -> int:
    """GPUs a CUDA program sees: those of ``nvidia-smi -L`` (``listing``), filtered by
    CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs; CUDA stops at the first invalid
    entry; unset = all, empty = none)."""
    uuids = re.findall(r"^GPU \d+:.*\(UUID: (GPU-[^)]+)\)", listing, re.M)
    count = len(re.findall(r"^GPU \d+:", listing, re.M))
    if cuda_visible_devices is None:
        return count
    seen = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if re.fullmatch(r"\d+", entry) and int(entry) < count:
            key = f"index {int(entry)}"
        elif entry.startswith("GPU-") and [u for u in uuids if u.startswith(entry)]:
            key = [u for u in uuids if u.startswith(entry)][0]
        elif entry.startswith("MIG-") and entry in listing:
            key = entry
        else:
            break
        if key in seen:
            break
        seen.append(key)
    return len(seen)


def gpus(args) -> None:
    smi = shutil.which("nvidia-smi")
    listing = ""
    if smi:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True)
        listing = proc.stdout if proc.returncode == 0 else ""
    print(visible_gpus(listing, os.environ.get("CUDA_VISIBLE_DEVICES")))


class BatchError(ValueError):
    """Settings that would not train with the intended batch; the message says the fix."""


def resolve_batch(visible: int, cpu: bool, num_gpus: Optional[int], max_tokens: int,
                  update_freq: Optional[int], batch_tokens: int,
                  allow_mismatch: bool) -> Tuple[int, int, int]:
    """(training processes, update frequency, tokens per update).

    The processes default to the visible GPUs (1 on CPU or without GPUs; CPU=1 with
    NUM_GPUS > 1 trains in that many gloo processes); the update
    frequency to the one that makes processes x max_tokens x update_freq = batch_tokens.
    A product that misses batch_tokens (e.g. 3, 5, 6 or 7 GPUs) is refused unless
    ``allow_mismatch``.
    """
    if num_gpus is None:
        num_gpus = 1 if cpu else max(1, visible)
    if num_gpus < 1:
        raise BatchError(f"NUM_GPUS={num_gpus}. Fix: set NUM_GPUS to 1 or more")
    if not cpu and num_gpus > max(1, visible):
        raise BatchError(
            f"NUM_GPUS={num_gpus} but {visible} GPU(s) are visible (nvidia-smi -L, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}). "
            "Fix: lower NUM_GPUS or make more GPUs visible")
    if update_freq is None:
        update_freq = max(1, round(batch_tokens / (num_gpus * max_tokens)))
    effective = num_gpus * max_tokens * update_freq
    if effective != batch_tokens and not allow_mismatch:
        raise BatchError(
            f"{num_gpus} GPU(s) x MAX_TOKENS={max_tokens} x update-freq {update_freq} = "
            f"{effective:,} tokens per update, not BATCH_TOKENS={batch_tokens:,} (the authors' "
            "8 GPUs x 4096). Fix: pick NUM_GPUS, MAX_TOKENS and UPDATE_FREQ whose product is "
            f"{batch_tokens:,} (e.g. NUM_GPUS=1, 2, 4 or 8 with MAX_TOKENS=4096), or accept "
            "the difference with ALLOW_BATCH_MISMATCH=1")
    return num_gpus, update_freq, effective


def batch(args) -> None:
    def optional(value: str) -> Optional[int]:
        return int(value) if value.strip() else None

    try:
        result = resolve_batch(int(args.visible), args.cpu == "1", optional(args.num_gpus),
                               int(args.max_tokens), optional(args.update_freq),
                               int(args.batch_tokens), args.allow_mismatch == "1")
    except BatchError as e:
        sys.exit(f"pipeline.sh: error: {e}")
    print(*result)


# -- review: what a run will cost and how it differs from the authors' ----------------

#: The authors' settings (docs/method.md section 1; the paper's teacher and students).
AUTHORS = {
    "EFFECTIVE_TOKENS": 32768, "LR": 7e-4, "WARMUP": 4000, "PHASE2_WARMUP": 1000,
    "PHASE2_SCHEDULE": "restart",
    "DROPOUT": 0.1, "ATTENTION_DROPOUT": 0.1, "ACTIVATION_DROPOUT": 0.1,
    "LABEL_SMOOTHING": 0.1, "SEED": 1, "FP16": 1, "KD_ALPHA": 0,
    "TEACHER_LAYERS": 6, "TEACHER_DIM": 512, "TEACHER_FFN": 2048, "TEACHER_HEADS": 8,
    "KD_UPDATES": 30000, "PHASE1_UPDATES": 30000, "PHASE2_UPDATES": 30000,
    "AVG_LAST": 5, "TEACHER_AVERAGE": "epochs",
    "KD_BEAM": 6, "KD_LENPEN": 1.0, "BEAM": 6, "LENPEN": 1.0,
}
#: The authors' student decoders (layers, width, FFN, heads): stu1 and stu2.
AUTHORS_STUDENTS = {(1, 256, 1024, 8): "stu1", (2, 512, 2048, 8): "stu2"}


def _same(value: str, authors) -> bool:
    if isinstance(authors, str):
        return value == authors
    try:
        return float(value) == float(authors)
    except ValueError:
        return False


def differences_from_authors(settings: Dict[str, str]) -> List[str]:
    """One line per setting that differs from the authors' (empty: none)."""
    lines = [f"{key}={settings.get(key)} (authors: {value})" for key, value in AUTHORS.items()
             if not _same(settings.get(key, ""), value)]
    student = tuple(int(settings[f"STUDENT_DEC_{k}"]) for k in ("LAYERS", "DIM", "FFN", "HEADS"))
    if student not in AUTHORS_STUDENTS:
        lines.append(f"student decoder {'/'.join(map(str, student))} (authors: 1/256/1024/8 "
                     "or 2/512/2048/8)")
    if settings.get("TRAIN_EXTRA"):
        lines.append(f"TRAIN_EXTRA={settings['TRAIN_EXTRA']} (authors: none)")
    return lines


def _dictionary_size(data: Optional[str], lang: str) -> Optional[int]:
    path = os.path.join(data or "", f"dict.{lang}.txt")
    return _count(path) + 4 if data and os.path.isfile(path) else None  # + <s> <pad> </s> <unk>


def _transformer_parameters(layers: int, dim: int, ffn: int, decoder: bool,
                            encoder_dim: int) -> int:
    attention = 4 * dim * dim + 4 * dim
    cross = 2 * dim * dim + 2 * dim * encoder_dim + 4 * dim
    block = attention + 2 * dim * ffn + ffn + dim + 4 * dim + (cross + 2 * dim if decoder else 0)
    return layers * block + 2 * dim


def stage_checkpoints(settings: Dict[str, str], data: Optional[str]) -> Dict[str, Tuple[int, int, int]]:
    """{training stage: (parameters, bytes a checkpoint, checkpoint files kept at its peak)}.

    A checkpoint holds the model (2 bytes a parameter with FP16, else 4) and Adam's two
    fp32 moments (8 bytes a trained parameter); the files kept are those of the stage's
    averaging rule (pipeline.sh retention_flags) plus checkpoint_last/best/avg.
    """
    src, tgt = settings["SRC"], settings["TGT"]
    guess = int(settings["BPE_MERGES"]) + 1000
    v_src = _dictionary_size(data, src) or guess
    v_tgt = _dictionary_size(data, tgt) or guess
    t = {k: int(settings[f"TEACHER_{k}"]) for k in ("LAYERS", "DIM", "FFN")}
    s = {k: int(settings[f"STUDENT_DEC_{k}"]) for k in ("LAYERS", "DIM", "FFN")}
    encoder = _transformer_parameters(t["LAYERS"], t["DIM"], t["FFN"], False, t["DIM"])
    teacher = (encoder + _transformer_parameters(t["LAYERS"], t["DIM"], t["FFN"], True, t["DIM"])
               + v_src * t["DIM"] + 2 * v_tgt * t["DIM"])
    student = (encoder + _transformer_parameters(s["LAYERS"], s["DIM"], s["FFN"], True, t["DIM"])
               + v_src * t["DIM"] + 2 * v_tgt * s["DIM"])
    model_bytes = 2 if settings.get("FP16") == "1" else 4
    last = int(settings["AVG_LAST"])
    kept = {"epochs": last + 4, "updates": 2 * last + 3}
    return {
        "teacher": (teacher, teacher * (model_bytes + 8), kept[settings["TEACHER_AVERAGE"]]),
        "kd_student": (student, student * (model_bytes + 8), kept[settings["STUDENT_AVERAGE"]]),
        # phase 1: the frozen teacher inside the model, generators about a student's size
        "wd_phase1": (student, teacher * model_bytes + student * (model_bytes + 8), 3),
        "materialize": (student, student * 4, 1),
        "wd_phase2": (student, student * (model_bytes + 8), kept[settings["STUDENT_AVERAGE"]]),
    }


def disk_estimate(settings: Dict[str, str], data: Optional[str]) -> Tuple[List[str], float]:
    """Lines of estimated checkpoint disk use per training stage, and the total (GB)."""
    guess = int(settings["BPE_MERGES"]) + 1000
    vocab_note = "dictionaries of data-bin" if _dictionary_size(data, settings["TGT"]) else \
        f"~{guess:,}-word dictionaries (BPE_MERGES + 1000; exact once prepare has run)"
    gb = 1e9
    lines, total = [], 0.0
    for name, (params, size, files) in stage_checkpoints(settings, data).items():
        total += size * files / gb
        lines.append(f"  {name:<12} {files:>2} x {size / gb:5.2f} GB = {size * files / gb:6.1f} GB"
                     f"  ({params / 1e6:.0f}M parameters)")
    lines.append(f"  (from {vocab_note}; data and KD data come on top)")
    return lines, total


def review(args) -> None:
    """The plan's summary of pipeline.sh's settings (KEY=VALUE lines on stdin)."""
    settings = dict(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line)
    n, uf, tokens = (int(settings[k]) for k in ("NUM_GPUS", "UPDATE_FREQ", "MAX_TOKENS"))
    effective = int(settings["EFFECTIVE_TOKENS"])
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"GPUs: {settings['VISIBLE_GPUS']} visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES="
          f"{'(unset)' if cuda is None else cuda}); training processes: {n} "
          f"(--distributed-world-size {n}){', CPU' if settings.get('CPU') == '1' else ''}")
    print(f"batch: {n} x {tokens} tokens x update-freq {uf} = {effective:,} tokens per update "
          f"(BATCH_TOKENS={int(settings['BATCH_TOKENS']):,}; authors: 32,768)")
    print(f"dropout {settings['DROPOUT']}, attention dropout {settings['ATTENTION_DROPOUT']}, "
          f"activation dropout {settings['ACTIVATION_DROPOUT']} (every training stage)")
    rule = {"epochs": "epoch checkpoints",
            "updates": f"saves, {settings['SAVE_INTERVAL_UPDATES']} updates apart"}
    print(f"averaging: teacher: last {settings['AVG_LAST']} {rule[settings['TEACHER_AVERAGE']]}; "
          f"kd_student, wd_phase2: last {settings['AVG_LAST']} "
          f"{rule[settings['STUDENT_AVERAGE']]}")
    lines, total = disk_estimate(settings, args.data)
    print(f"disk (estimate, checkpoints kept at the peak of each stage): {total:.0f} GB")
    print("\n".join(lines))
    diffs = differences_from_authors(settings)
    print("differences from the authors' settings (docs/method.md section 1): "
          + ("none" if not diffs else ""))
    for line in diffs:
        print(f"  - {line}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("concat")
    for name in ("--src-lang", "--tgt-lang", "--out-prefix"):
        p.add_argument(name, required=True)
    p.add_argument("prefixes", nargs="+")
    p.set_defaults(run=concat)
    p = sub.add_parser("check-aligned")
    p.add_argument("src")
    p.add_argument("tgt")
    p.set_defaults(run=check_aligned)
    p = sub.add_parser("tokenize")
    p.add_argument("--lang", required=True)
    p.add_argument("--mode", choices=("moses", "none"), default="moses")
    p.add_argument("--remove-diacritics", action="store_true",
                   help="Romanian: also ă â î ș ț -> a a i s t")
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
    p = sub.add_parser("gpus")
    p.set_defaults(run=gpus)
    p = sub.add_parser("batch")
    for name in ("--visible", "--cpu", "--num-gpus", "--max-tokens", "--update-freq",
                 "--batch-tokens", "--allow-mismatch"):
        p.add_argument(name, required=True)
    p.set_defaults(run=batch)
    p = sub.add_parser("review")
    p.add_argument("--data", help="data-bin (its dictionary sizes, once prepared)")
    p.set_defaults(run=review)
    p = sub.add_parser("average")
    p.add_argument("--dir", required=True, help="the stage's save dir")
    p.add_argument("--rule", choices=("epochs", "updates"), required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=average)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
