"""``wd-kd-data DATA --teacher-path TEACHER.pt``: sequence-level KD data (docs/method.md sections 1, 7).

Decodes the source side of a data-bin's training split with the teacher (beam 6,
length penalty 1.0, top-1 hypothesis, BPE kept), restores corpus order, and writes
the result into the same data-bin as split ``train1`` with the same dictionaries:
fairseq's translation task then trains on ``train`` + ``train1`` concatenated, every
source twice. ``valid`` is not touched.

Two engines decode with the same search (``kd_decoding`` says where they differ):
CTranslate2 (the default where it is installed and converts the teacher; the
conversion is cached in ``DATA/kd-train1/ct2-QUANT/``) and fairseq's
``SequenceGenerator``.

Real decoding is messy, so:

* empty hypotheses, hypotheses that ran into the length limit (``--max-len-a/b``,
  usually degenerate repetitions), sources longer than the teacher accepts and
  CTranslate2 hypotheses containing ``<pad>``
  fall back to the sentence's reference target (counted in ``summary.json``), so
  the two halves stay aligned one to one;
* results are saved in shards under ``DATA/kd-train1/`` every ``--save-every``
  sentences; an interrupted run resumes where it stopped and decodes the rest in the
  same batches (so the result is the same as an uninterrupted run's), and a run with
  other settings (teacher, engine, quantization, beam, data...) restarts cleanly;
* shards are merged in corpus order and binarised by streaming: memory does not grow
  with the corpus (the mmap format; fairseq's legacy formats go through its builder);
* the split is written to temporary files and renamed into place with the source
  index last: fairseq only sees ``train1`` once every file of it is complete;
* the split serves only its own direction: fairseq reads ``train1.SRC-TGT`` backwards
  for TGT-SRC where that direction has no ``train1`` of its own, so an empty
  ``train1.TGT-SRC`` is written there (a later run for TGT-SRC replaces it);
* a data-bin whose source and target line counts differ is refused.
"""

import argparse
import glob
import hashlib
import heapq
import importlib.util
import json
import logging
import multiprocessing
import os
import struct
import sys
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from fairseq.data import Dictionary, data_utils, indexed_dataset

from .arguments import at_least_one, finite_float, nonnegative_float, nonnegative_int, positive_int
from .disk_space import checkpoint_tensor_sizes, disk_full_errors, require_free_space
from .files import atomic_writer, write_atomic
from .kd_decoding import (PAD_TOKEN, CTranslate2Engine, FairseqEngine, Progress, batch_plan,
                          cpu_threads, hypothesis_limit)
from .multilingual import NO_LANG_TOKENS, LangTokens, data_task, lang_tokens
from .teacher import WDSetupError, load_teacher, read_checkpoint, task_langs

logger = logging.getLogger("wd_fairseq.kd_data")

OK, EMPTY, OVERLONG, SOURCE_TOO_LONG = "ok", "empty", "overlong", "source-too-long"
PAD = "pad-token"  # CTranslate2 put <pad> in the hypothesis (fairseq never does)
LENGTH_RATIO, LOW_SCORE = "length-ratio", "low-score"  # the optional filters
FLAGS = (OK, EMPTY, OVERLONG, SOURCE_TOO_LONG, PAD, LENGTH_RATIO, LOW_SCORE)
ENGINES = ("ctranslate2", "fairseq")
#: --quantization choices of the CTranslate2 engine, by device.
QUANTIZATIONS = {"cpu": ("int8", "float32"), "cuda": ("float16", "int8_float16", "int8", "float32")}
#: Shards merged at once (open files); more are first merged into bigger shards.
MAX_OPEN_SHARDS = 128


def infer_langs(data: str, split: str) -> Tuple[str, str]:
    """(source, target) languages of ``DATA/{split}.{src}-{tgt}.{src}.idx``, the one
    direction of a bilingual data-bin."""
    found = sorted(glob.glob(os.path.join(data, f"{split}.*-*.*.idx")))
    pairs = []
    for path in found:
        pair, lang = os.path.basename(path)[len(split) + 1:-len(".idx")].split(".")
        src, tgt = pair.split("-")
        if lang == src:
            pairs.append((src, tgt))
    if len(pairs) > 1:
        raise WDSetupError(
            f"DATA {data}: split '{split}' has several directions "
            f"({', '.join('-'.join(p) for p in pairs)}). Fix: pass --source-lang and "
            "--target-lang (one run per direction)")
    if pairs:
        return pairs[0]
    raise WDSetupError(
        f"DATA {data}: no binarised split '{split}' ({split}.SRC-TGT.SRC.idx). Fix: "
        "pass a data-bin written by fairseq-preprocess, or set --source-lang/--target-lang"
    )


def kd_task(data: str, teacher_path: str, source_lang: str, target_lang: str):
    """(task, language tokens) that decode ``source_lang``-``target_lang`` of ``data`` with
    the teacher, checked against it (every engine): fairseq's translation task, or the
    teacher's own multilingual task set up for that direction."""
    state = read_checkpoint(teacher_path, "--teacher-path")
    task = data_task(state, data, source_lang, target_lang, "--teacher-path", teacher_path)
    del state
    return task, lang_tokens(task, source_lang, target_lang)


class Split:
    """File names of one binarised split ``{data}/{name}.{src}-{tgt}.{lang}``."""

    def __init__(self, data: str, name: str, src: str, tgt: str):
        self.data, self.name, self.src, self.tgt = data, name, src, tgt

    def prefix(self, lang: str) -> str:
        return os.path.join(self.data, f"{self.name}.{self.src}-{self.tgt}.{lang}")

    def files(self) -> List[str]:
        """Every file, in the order they are put in place (source index last)."""
        return [self.prefix(self.tgt) + ".bin", self.prefix(self.tgt) + ".idx",
                self.prefix(self.src) + ".bin", self.prefix(self.src) + ".idx"]

    def visible(self) -> bool:
        """Whether fairseq's translation task would load this split."""
        return os.path.exists(self.prefix(self.src) + ".idx")


def load_side(split: Split, lang: str, dictionary: Dictionary):
    prefix = split.prefix(lang)
    impl = indexed_dataset.infer_dataset_impl(prefix)
    dataset = data_utils.load_indexed_dataset(prefix, dictionary, impl) if impl else None
    if dataset is None:
        raise WDSetupError(
            f"{prefix}.{{bin,idx}}: not found or unreadable. Fix: binarise split "
            f"'{split.name}' with fairseq-preprocess into {split.data}"
        )
    return dataset, impl


class Filters(NamedTuple):
    """Optional outlier filters (None: off). A KD pair falls back to the reference when
    hypothesis and source lengths differ by more than a factor ``max_length_ratio``, or
    when the teacher's length-normalised log-probability is below ``min_score``."""

    max_length_ratio: Optional[float] = None
    min_score: Optional[float] = None


def classify(tokens: List[str], limit: int, source_length: int = 0, score: float = 0.0,
             filters: Filters = Filters()) -> str:
    """Flag of a hypothesis ``tokens`` (EOS not counted) decoded with length limit
    ``limit`` from ``source_length`` tokens (EOS not counted), scored ``score``."""
    length = len(tokens)
    if PAD_TOKEN in tokens:
        return PAD
    if length == 0:
        return EMPTY
    if length >= limit:  # fairseq forces EOS there, CTranslate2 cuts: it did not end
        return OVERLONG
    if filters.max_length_ratio is not None and source_length and \
            max(length / source_length, source_length / length) > filters.max_length_ratio:
        return LENGTH_RATIO
    if filters.min_score is not None and score < filters.min_score:
        return LOW_SCORE
    return OK


Row = Tuple[int, str, str]  # (corpus index, flag, hypothesis text)


class ShardStore:
    """Decoded sentences saved as ``part-WW-NNNNNN.tsv`` (``id<TAB>flag<TAB>text``, sorted
    by id; ``WW`` the writing process) in a work directory, with the run's settings in
    ``manifest.json``."""

    def __init__(self, directory: str, worker: int = 0):
        self.directory, self.worker = directory, worker

    def shards(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.directory, "part-*.tsv")))

    def open(self, manifest: Dict) -> None:
        """Keep the shards of an earlier run with the same manifest, else start afresh."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, "manifest.json")
        old = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        for stale in glob.glob(os.path.join(self.directory, ".*.tmp")):  # left by a killed run
            os.remove(stale)
        if old != manifest:
            if self.shards():
                logger.info("%s: earlier shards were made with other settings; restarting",
                            self.directory)
            for shard in self.shards():
                os.remove(shard)
            write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def done(self, sentences: int) -> np.ndarray:
        """Boolean mask of the sentences already saved."""
        mask = np.zeros(sentences, dtype=bool)
        for shard in self.shards():
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    mask[int(line[:line.index("\t")])] = True
        return mask

    def save(self, rows: List[Row]) -> None:
        self._write(sorted(rows))

    def _write(self, rows) -> None:
        own = sorted(glob.glob(os.path.join(self.directory, f"part-{self.worker:02d}-*.tsv")))
        number = int(os.path.basename(own[-1])[8:-4]) + 1 if own else 0
        path = os.path.join(self.directory, f"part-{self.worker:02d}-{number:06d}.tsv")
        with atomic_writer(path) as f:
            for index, flag, text in rows:
                f.write(f"{index}\t{flag}\t{text}\n")

    def merged(self) -> Iterator[Row]:
        """Every saved row once, in corpus order, streamed from the shards."""
        while len(self.shards()) > MAX_OPEN_SHARDS:  # merge the oldest into one shard
            group = self.shards()[:MAX_OPEN_SHARDS]
            self._write(_merge(group))
            for shard in group:  # a crash before this leaves duplicates, which _merge drops
                os.remove(shard)
        return _merge(self.shards())


def _merge(shards: List[str]) -> Iterator[Row]:
    files = [open(shard, encoding="utf-8") for shard in shards]
    try:
        previous = None
        rows = (map(_parse_row, f) for f in files)
        for row in heapq.merge(*rows, key=lambda r: r[0]):
            if row[0] != previous:
                previous = row[0]
                yield row
    finally:
        for f in files:
            f.close()


def _parse_row(line: str) -> Row:
    index, flag, text = line.rstrip("\n").split("\t", 2)
    return int(index), flag, text


def file_stamp(path: str, content_hash: bool = False) -> Dict:
    """Path, size and mtime of a file, and with ``content_hash`` its SHA-256."""
    stat = os.stat(path)
    stamp = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if content_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        stamp["sha256"] = digest.hexdigest()
    return stamp


class MMapWriter:
    """fairseq's mmap indexed dataset (``MMapIndexedDatasetBuilder``'s bytes), written
    by streaming: sizes go to a side file, not a list, so memory stays flat."""

    def __init__(self, bin_path: str, vocab_size: int):
        self.dtype = indexed_dataset.best_fitting_int_dtype(vocab_size)
        self.data = open(bin_path, "wb")
        self.sizes_path = bin_path + ".sizes"
        self.sizes = open(self.sizes_path, "wb")
        self.count = 0

    def add_item(self, tensor: torch.Tensor) -> None:
        array = np.asarray(tensor.numpy(), dtype=self.dtype)
        self.data.write(array.tobytes(order="C"))
        self.sizes.write(np.int32(array.size).tobytes())
        self.count += 1

    def finalize(self, idx_path: str) -> None:
        self.data.close()
        self.sizes.close()
        index = indexed_dataset.MMapIndexedDataset.Index
        with open(idx_path, "wb") as out, open(self.sizes_path, "rb") as sizes:
            out.write(index._HDR_MAGIC)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", indexed_dataset._dtype_header_code(self.dtype)))
            out.write(struct.pack("<Q", self.count))
            while chunk := sizes.read(1 << 22):
                out.write(chunk)
            sizes.seek(0)
            address, itemsize = 0, np.dtype(self.dtype).itemsize
            while chunk := sizes.read(1 << 22):
                ends = address + np.cumsum(np.frombuffer(chunk, dtype=np.int32), dtype=np.int64) * itemsize
                out.write(np.concatenate(([address], ends[:-1])).astype(np.int64).tobytes())
                address = int(ends[-1])
        os.remove(self.sizes_path)


def write_split(out: Split, rows: Iterator[torch.Tensor], source_prefix: str, impl: str,
                vocab_size: int) -> None:
    """Write ``out`` (target ``rows``, streamed; source copied from ``source_prefix``)
    so that fairseq never sees it half-written: temporary files first, then renames
    with the source index last."""
    if out.visible():
        os.remove(out.prefix(out.src) + ".idx")
    tmp = _tmp_files(out)
    tgt_bin, tgt_idx, src_bin, src_idx = out.files()
    if impl == "mmap":
        builder = MMapWriter(tmp[tgt_bin], vocab_size)
    else:
        builder = indexed_dataset.make_builder(tmp[tgt_bin], impl=impl, vocab_size=vocab_size)
    for row in rows:
        builder.add_item(row)
    builder.finalize(tmp[tgt_idx])
    for ext, path in ((".bin", src_bin), (".idx", src_idx)):
        with open(source_prefix + ext, "rb") as f_in, open(tmp[path], "wb") as f_out:
            while chunk := f_in.read(1 << 24):
                f_out.write(chunk)
    _put_in_place(out, tmp)


def _tmp_files(out: Split) -> Dict[str, str]:
    """The temporary file of each file of ``out``."""
    return {path: os.path.join(out.data, ".kd-tmp." + os.path.basename(path)) for path in out.files()}


def _put_in_place(out: Split, tmp: Dict[str, str]) -> None:
    for path in out.files():
        with open(tmp[path], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp[path], path)


def is_placeholder(split: Split) -> bool:
    """Whether ``split`` is visible and empty (the guard of ``guard_reversed``)."""
    prefix = split.prefix(split.src)
    impl = indexed_dataset.infer_dataset_impl(prefix) if split.visible() else None
    dataset = data_utils.load_indexed_dataset(prefix, None, impl) if impl else None
    return dataset is not None and len(dataset) == 0


def guard_reversed(out: Split, impl: str, vocab_size: int) -> None:
    """Make the KD split ``out`` serve only its own direction. fairseq's translation tasks
    read a split of SRC-TGT backwards as TGT-SRC's where TGT-SRC has none of its own: the
    teacher's outputs would become the reversed direction's sources (back-translation, not
    KD). An empty split of the reversed direction, where it has none, stops that; wd-kd-data
    for that direction replaces it."""
    reverse = Split(out.data, out.name, out.tgt, out.src)
    if reverse.visible():
        return
    tmp = _tmp_files(reverse)
    for lang in (reverse.tgt, reverse.src):
        bin_path, idx_path = tmp[reverse.prefix(lang) + ".bin"], tmp[reverse.prefix(lang) + ".idx"]
        builder = MMapWriter(bin_path, vocab_size) if impl == "mmap" else \
            indexed_dataset.make_builder(bin_path, impl=impl, vocab_size=vocab_size)
        builder.finalize(idx_path)
        if impl == "mmap":  # (numpy cannot map an empty file: one id that no sentence uses)
            with open(bin_path, "ab") as f:
                f.write(np.zeros(1, dtype=builder.dtype).tobytes())
    _put_in_place(reverse, tmp)
    logger.info("wrote %s.{%s,%s} with 0 sentences, so that fairseq does not read the KD split "
                "of %s-%s backwards as %s-%s's (wd-kd-data -s %s -t %s replaces it)",
                os.path.join(out.data, f"{out.name}.{reverse.src}-{reverse.tgt}"), reverse.src,
                reverse.tgt, out.src, out.tgt, reverse.src, reverse.tgt, reverse.src, reverse.tgt)


def kd_space_needed(inp: Split, source, reference, tgt_dict: Dictionary, store: ShardStore,
                    manifests: Dict) -> int:
    """Estimated bytes that a KD run still writes: the CTranslate2 conversion (unless
    cached; while converting, a copy of the teacher beside it), the decoded shards and
    text, and the split (target side about the reference's size, source side copied),
    less the shards already saved. Targets count a fifth more than the references."""
    sentences = len(source)
    symbols = [(len(s.encode()) + 1) * c for s, c in zip(tgt_dict.symbols[tgt_dict.nspecial:],
                                                         tgt_dict.count[tgt_dict.nspecial:])]
    bytes_per_token = sum(symbols) / max(sum(tgt_dict.count[tgt_dict.nspecial:]), 1)
    text = 1.2 * (int(reference.sizes.sum()) - sentences) * bytes_per_token
    shards = text + sentences * (len(str(sentences)) + len(SOURCE_TOO_LONG) + 3)
    size = os.path.getsize
    target = 1.2 * size(inp.prefix(inp.tgt) + ".bin") + size(inp.prefix(inp.tgt) + ".idx") \
        + 4 * sentences  # (the index's side file of sizes)
    kd = shards + text + target + sum(size(inp.prefix(inp.src) + e) for e in (".bin", ".idx"))
    kd -= sum(size(shard) for shard in store.shards())
    needed = kd
    settings = manifests.get("ctranslate2")
    if settings is not None and not os.path.exists(
            os.path.join(store.directory, f"ct2-{settings['quantization']}", "model.bin")):
        from .export_ctranslate2 import converted_bytes

        weights, teacher = checkpoint_tensor_sizes(settings["teacher"]["path"])
        needed = converted_bytes(weights, settings["quantization"], inp.data) + max(teacher, kd)
    return int(needed)


def _ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def _device(cpu: bool, engine: str) -> str:
    if cpu:
        return "cpu"
    if engine == "ctranslate2":
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_quantization(quantization: Optional[str], device: str) -> str:
    choices = QUANTIZATIONS[device]
    if quantization is None:
        return choices[0]
    if quantization not in choices:
        raise WDSetupError(
            f"--quantization {quantization}: not available on the {device} "
            f"(choose {', '.join(choices)}). Fix: pick one of those"
            + (", or run on a GPU" if device == "cpu" else "")
        )
    return quantization


def _engine_settings(engine: str, device: str, quantization: Optional[str], fp16: bool) -> Dict:
    """The manifest entries that make one engine's output differ from another's."""
    if engine == "ctranslate2":
        return {"engine": engine, "device": device,
                "quantization": _check_quantization(quantization, device)}
    return {"engine": engine, "device": device, "fp16": fp16}


def build_kd_split(data: str, teacher_path: str, source_lang: Optional[str] = None,
                   target_lang: Optional[str] = None, split: str = "train",
                   out_split: str = "train1", beam: int = 6, lenpen: float = 1.0,
                   max_len_a: float = 2.0, max_len_b: int = 10,
                   max_tokens: Optional[int] = 4096, batch_size: Optional[int] = None,
                   save_every: int = 50000, fp16: bool = False, cpu: bool = False,
                   overwrite: bool = False, engine: Optional[str] = None,
                   quantization: Optional[str] = None, threads: Optional[int] = None,
                   workers: Optional[int] = None, filters: Filters = Filters()) -> Dict:
    """Decode ``split`` of ``data`` with the teacher and write it as ``out_split``.

    ``engine`` None: CTranslate2 where installed and the teacher converts, else fairseq.
    ``workers``: fairseq processes (default: one per visible GPU, or one on the CPU);
    CTranslate2 uses every visible GPU from one process.
    Returns the summary (also written to ``DATA/kd-{out_split}/summary.json``).
    """
    if not os.path.isdir(data):
        raise WDSetupError(f"DATA {data}: no such directory. Fix: pass a fairseq data-bin")
    if out_split == split:
        raise WDSetupError(f"--out-split {out_split}: must differ from --split {split}")
    if engine is None and quantization is not None:
        engine = "ctranslate2"  # only it has a --quantization
    if engine is not None and engine not in ENGINES:
        raise WDSetupError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "ctranslate2" and not _ctranslate2_available():
        raise WDSetupError("--engine ctranslate2: the ctranslate2 package is not installed. "
                           "Fix: pip install ctranslate2, or pass --engine fairseq")
    if workers is not None and workers < 1:
        raise WDSetupError(f"--workers {workers}: must be at least 1")
    if engine == "ctranslate2" and (workers or 1) > 1:
        raise WDSetupError(f"--workers {workers}: for --engine fairseq; CTranslate2 decodes on "
                           "every visible GPU from one process. Fix: drop --workers")
    if engine == "fairseq" and quantization is not None:
        raise WDSetupError(f"--quantization {quantization}: only for --engine ctranslate2. "
                           "Fix: drop it, or pass --engine ctranslate2 (fairseq: --fp16)")
    if quantization is not None:
        _check_quantization(quantization, _device(cpu, "ctranslate2"))
    if not os.path.isfile(teacher_path):
        raise WDSetupError(
            f"--teacher-path {teacher_path}: no such file. Fix: pass the path of an existing "
            "fairseq checkpoint (.pt)"
        )
    if source_lang is None or target_lang is None:
        source_lang, target_lang = infer_langs(data, split)
    task, tokens = kd_task(data, teacher_path, source_lang, target_lang)
    inp = Split(data, split, source_lang, target_lang)
    out = Split(data, out_split, source_lang, target_lang)
    source, impl = load_side(inp, source_lang, task.source_dictionary)
    reference, _ = load_side(inp, target_lang, task.target_dictionary)
    if len(source) != len(reference):
        raise WDSetupError(
            f"{inp.prefix(source_lang)} has {len(source)} sentences but "
            f"{inp.prefix(target_lang)} has {len(reference)}. Fix: re-binarise the "
            "split from parallel text files with equal line counts"
        )
    candidates = [engine] if engine else [e for e in ENGINES
                                          if e == "fairseq" or _ctranslate2_available()]
    common = {
        "teacher": file_stamp(teacher_path, content_hash=True),
        "source": file_stamp(inp.prefix(source_lang) + ".bin"),
        "target": file_stamp(inp.prefix(target_lang) + ".bin"),
        "sentences": len(source), "out_split": out_split,
        "beam": beam, "lenpen": lenpen, "max_len_a": max_len_a, "max_len_b": max_len_b,
        "max_tokens": max_tokens, "batch_size": batch_size, "filters": filters._asdict(),
    }
    if tokens != NO_LANG_TOKENS:
        common["lang_tokens"] = tokens._asdict()
    manifests = {e: {**common, **_engine_settings(e, _device(cpu, e), quantization, fp16)}
                 for e in candidates}
    # a multilingual data-bin holds several directions: one work directory each
    work_dir = f"kd-{out_split}" + (f".{source_lang}-{target_lang}" if tokens != NO_LANG_TOKENS else "")
    store = ShardStore(os.path.join(data, work_dir))
    summary_path = os.path.join(store.directory, "summary.json")
    vocab_size = max(len(task.source_dictionary), len(task.target_dictionary))
    if out.visible() and not is_placeholder(out):
        if not overwrite and os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
            if summary.get("manifest") in manifests.values():
                logger.info("%s: up to date", out.prefix(source_lang))
                guard_reversed(out, impl, vocab_size)
                return summary
        if not overwrite:
            raise WDSetupError(
                f"{out.prefix(source_lang)}.idx exists (from another teacher, data or "
                f"settings). Fix: pass --overwrite to replace split '{out_split}', or "
                "choose another --out-split"
            )
    for stale in glob.glob(os.path.join(data, f".kd-tmp.{out_split}.*")):
        os.remove(stale)

    needed = kd_space_needed(inp, source, reference, task.target_dictionary, store, manifests)
    converting = "teacher conversion and " if "ctranslate2" in manifests else ""
    what = (f"the KD split '{out_split}' ({converting}decoded shards in {work_dir}/, then "
            f"{out_split}.{source_lang}-{target_lang}.{{{source_lang},{target_lang}}}.*)")
    fix = (f"free space on the file system of {data} (or move the data-bin to a bigger one) and "
           f"rerun: the decoded shards in {store.directory} are kept and the run resumes")
    require_free_space(data, needed, what, fix)
    partial = [os.path.join(data, f".kd-tmp.{out_split}.*")]  # (files.atomic_writer cleans up its own)

    os.makedirs(store.directory, exist_ok=True)
    decoder = _build_engine(candidates, manifests, teacher_path, task, tokens, data, store.directory,
                            beam, lenpen, max_len_a, max_len_b, threads, explicit=engine is not None)
    manifest = manifests[decoder.name]
    if decoder.name == "fairseq" and decoder.device.type == "cuda":
        workers = workers or torch.cuda.device_count()
        if workers > torch.cuda.device_count():
            raise WDSetupError(f"--workers {workers}: only {torch.cuda.device_count()} GPUs "
                               "are visible. Fix: pass at most that many")
    if decoder.name == "ctranslate2" and (workers or 1) > 1:
        raise WDSetupError(f"--workers {workers}: for --engine fairseq; the teacher converted, "
                           "so CTranslate2 decodes (on every visible GPU, from one process). "
                           "Fix: drop --workers, or pass --engine fairseq")
    workers = workers or 1
    store.open(manifest)
    done = store.done(len(source))
    max_source, max_target = decoder.max_positions()
    too_long = np.flatnonzero(source.sizes > max_source)
    plan = batch_plan(source.sizes, np.flatnonzero(source.sizes <= max_source), max_tokens,
                      batch_size)
    todo = [batch for batch in plan if not done[batch].all()]
    remaining = sum(len(b) for b in todo)
    if not done[too_long].all():
        store.save([(int(i), SOURCE_TOO_LONG, "") for i in too_long if not done[i]])
    if remaining:
        logger.info("decoding %d of %d sentences of %s with %s, beam %d, lenpen %s",
                    remaining, len(source), inp.prefix(source_lang), _describe(decoder, workers),
                    beam, lenpen)
    started = time.time()
    if decoder.name == "fairseq" and workers > 1:
        devices = [f"cuda:{r}" for r in range(workers)] if decoder.device.type == "cuda" \
            else ["cpu"] * workers
        decoder.teacher.cpu()  # the workers load their own copies
        job = dict(data=data, source_lang=source_lang, target_lang=target_lang, split=split,
                   teacher_path=teacher_path, fp16=manifest["fp16"], beam=beam, lenpen=lenpen,
                   max_len_a=max_len_a, max_len_b=max_len_b, threads=threads,
                   directory=store.directory, save_every=save_every, filters=tuple(filters))
        _run_workers(job, devices, todo)
    else:
        with disk_full_errors(data, needed, what, fix, partial):
            decode_into(decoder, source, todo, store, save_every, max_len_a, max_len_b, filters)
    decode_seconds = time.time() - started
    done = store.done(len(source))
    if not done.all():
        raise WDSetupError(
            f"{store.directory}: shards hold {int(done.sum())} sentences, expected "
            f"{len(source)}. Fix: delete {store.directory} and rerun"
        )

    tgt_dict = task.target_dictionary
    counts = dict.fromkeys(FLAGS, 0)
    text_path = os.path.join(store.directory, f"{out_split}.{target_lang}")

    def target_rows(text_file) -> Iterator[torch.Tensor]:
        for expected, (index, flag, text) in enumerate(store.merged()):
            assert index == expected, (index, expected)
            counts[flag] += 1
            if flag == OK:
                row = tgt_dict.encode_line(text, add_if_not_exist=False)
            else:
                row = reference[index]
                text = tgt_dict.string(row)
            text_file.write(text + "\n")
            yield row

    with disk_full_errors(data, needed, what, fix, partial):
        with atomic_writer(text_path) as text_file:
            write_split(out, target_rows(text_file), inp.prefix(source_lang), impl, len(tgt_dict))
    summary = {
        "sentences": len(source), "counts": counts,
        "fallback_to_reference": len(source) - counts[OK],
        "engine": decoder.name, **_describe_fields(decoder, workers),
        "decoded_this_run": remaining,
        "decode_seconds": round(decode_seconds, 1),
        "sentences_per_second": round(remaining / decode_seconds, 2) if remaining else None,
        "manifest": manifest,
    }
    with disk_full_errors(data, needed, what, fix, partial):
        write_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for shard in store.shards():  # (after the summary: a rerun finds the split up to date)
        os.remove(shard)
    with disk_full_errors(data, needed, what, fix, partial):
        guard_reversed(out, impl, vocab_size)
    logger.info("wrote %s.{%s,%s} (%d sentences; fell back to the reference for %d: %s)",
                os.path.join(data, f"{out_split}.{source_lang}-{target_lang}"), source_lang,
                target_lang, len(source), summary["fallback_to_reference"],
                ", ".join(f"{k} {v}" for k, v in counts.items() if k != OK))
    return summary


def decode_into(decoder, source, batches: List[np.ndarray], store: ShardStore, save_every: int,
                max_len_a: float, max_len_b: int, filters: Filters = Filters(),
                label: str = "") -> None:
    """Decode ``batches`` of ``source`` with ``decoder``, saving a shard every
    ``save_every`` sentences (whole batches only)."""
    max_target = decoder.max_positions()[1]
    progress = Progress(sum(len(b) for b in batches), label)
    rows = []
    for hypotheses in decoder.translate(source, batches):
        for index, tokens, score in hypotheses:
            size = int(source.sizes[index])
            limit = hypothesis_limit(size, decoder.tokens, max_len_a, max_len_b, max_target)
            flag = classify(tokens, limit, size - 1, score, filters)
            rows.append((index, flag, " ".join(tokens)))
        progress.update(len(hypotheses))
        if len(rows) >= save_every:
            store.save(rows)
            rows = []
    if rows:
        store.save(rows)


def _run_workers(job: Dict, devices: List[str], batches: List[np.ndarray]) -> None:
    """One fairseq process per device on every ``len(devices)``-th batch of the plan."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_fairseq_worker,
                                 args=(job, worker, device, batches[worker::len(devices)]))
                 for worker, device in enumerate(devices)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [(w, p.exitcode) for w, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise WDSetupError(
            f"{job['directory']}: decoding process(es) (worker, exit code) {failed} failed; "
            "their errors are above. Fix: correct the cause and rerun: finished shards are kept"
        )


def _fairseq_worker(job: Dict, worker: int, device: str, batches: List[np.ndarray]) -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    task, tokens = kd_task(job["data"], job["teacher_path"], job["source_lang"], job["target_lang"])
    split = Split(job["data"], job["split"], job["source_lang"], job["target_lang"])
    source, _ = load_side(split, job["source_lang"], task.source_dictionary)
    engine = _fairseq_engine(job["teacher_path"], task, tokens, torch.device(device), job["fp16"],
                             job["threads"], job["beam"], job["lenpen"], job["max_len_a"],
                             job["max_len_b"])
    decode_into(engine, source, batches, ShardStore(job["directory"], worker), job["save_every"],
                job["max_len_a"], job["max_len_b"], Filters(*job["filters"]),
                label=f"worker {worker} ({device}): ")


def _fairseq_engine(teacher_path: str, task, tokens: LangTokens, device: torch.device, fp16: bool,
                    threads: Optional[int], beam: int, lenpen: float, max_len_a: float,
                    max_len_b: int) -> FairseqEngine:
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    teacher, _ = load_teacher(teacher_path, task)
    teacher = teacher.to(device).eval()
    if fp16:
        teacher = teacher.half()
    return FairseqEngine(teacher, task, tokens, beam, lenpen, max_len_a, max_len_b, device)


def _build_engine(candidates: List[str], manifests: Dict, teacher_path: str, task,
                  tokens: LangTokens, data: str,
                  work_dir: str, beam: int, lenpen: float, max_len_a: float, max_len_b: int,
                  threads: Optional[int], explicit: bool):
    """The first engine of ``candidates`` that accepts the teacher. An automatic choice
    falls back from CTranslate2 to fairseq when the converter refuses the teacher."""
    from .export_ctranslate2 import cached_export

    for name in candidates:
        settings = manifests[name]
        if name == "ctranslate2":
            quantization = settings["quantization"]
            try:
                cached = cached_export(teacher_path, os.path.join(work_dir, f"ct2-{quantization}"),
                                       data, quantization, settings["teacher"], "--teacher-path",
                                       task_langs(task))
            except WDSetupError as e:
                if explicit:
                    raise
                logger.info("CTranslate2 cannot take this teacher (%s); decoding with fairseq", e)
                continue
            return CTranslate2Engine(
                os.path.join(work_dir, f"ct2-{quantization}"), quantization, settings["device"],
                threads or cpu_threads(), beam, lenpen, max_len_a, max_len_b,
                task.source_dictionary, tokens,
                (min(cached["max_positions"][0], task.max_positions()[0]),
                 cached["max_positions"][1]))
        return _fairseq_engine(teacher_path, task, tokens, torch.device(settings["device"]),
                               settings["fp16"], threads, beam, lenpen, max_len_a, max_len_b)
    raise AssertionError("fairseq is always a candidate of an automatic choice")


def _describe_fields(engine, workers: int = 1) -> Dict:
    if engine.name == "ctranslate2":
        return {"quantization": engine.compute_type, "device": engine.device,
                "devices": engine.devices, "threads": engine.threads}
    return {"quantization": "float16" if next(engine.teacher.parameters()).dtype == torch.float16
            else "float32", "device": engine.device.type,
            "devices": list(range(workers)) if engine.device.type == "cuda" or workers > 1
            else [0],
            "threads": torch.get_num_threads() if engine.device.type == "cpu" else None}


def _describe(engine, workers: int = 1) -> str:
    fields = _describe_fields(engine, workers)
    threads = f", {fields['threads']} threads" if fields["threads"] else ""
    return (f"{engine.name} ({fields['quantization']} on {fields['device']} "
            f"{fields['devices']}{threads})")


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wd-kd-data",
        description="Sequence-level KD data: decode a data-bin's training source with the "
        "teacher (CTranslate2 or fairseq's beam search) and write it into the same data-bin "
        "as split train1, which fairseq-train concatenates with train.",
    )
    parser.add_argument("data", metavar="DATA", help="fairseq data-bin (fairseq-preprocess output)")
    parser.add_argument("--teacher-path", required=True, metavar="TEACHER.pt",
                        help="stock fairseq Transformer checkpoint (e.g. an average of the last 5)")
    parser.add_argument("--source-lang", "-s", help="default: inferred from the data-bin")
    parser.add_argument("--target-lang", "-t", help="default: inferred from the data-bin")
    parser.add_argument("--split", default="train", help="split to decode (default: train)")
    parser.add_argument("--out-split", default="train1",
                        help="split to write (default: train1, which fairseq concatenates with "
                        "train; valid stays the real valid split)")
    parser.add_argument("--engine", choices=ENGINES,
                        help="decoder (default: ctranslate2 where installed and the teacher "
                        "converts, else fairseq)")
    parser.add_argument("--quantization", choices=sorted({q for qs in QUANTIZATIONS.values() for q in qs}),
                        help="CTranslate2 weights/compute type: int8 (CPU default) or float32 "
                        "on the CPU; float16 (GPU default), int8_float16, int8 or float32 on GPUs")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads (default: every core this process may use)")
    parser.add_argument("--workers", type=positive_int,
                        help="fairseq engine: decoding processes, one per GPU (default: every "
                        "visible GPU, else 1 on the CPU); results do not depend on it")
    parser.add_argument("--beam", type=positive_int, default=6, help="beam size (default: 6, the authors')")
    parser.add_argument("--lenpen", type=nonnegative_float, default=1.0, help="length penalty (default: 1.0)")
    parser.add_argument("--max-len-a", type=nonnegative_float, default=2.0,
                        help="length limit a*source+b: hypotheses reaching it fall back to the "
                        "reference (default: a=2, b=10)")
    parser.add_argument("--max-len-b", type=nonnegative_int, default=10)
    parser.add_argument("--max-tokens", type=positive_int, default=4096, help="source tokens per batch")
    parser.add_argument("--batch-size", type=positive_int, help="sentences per batch (default: no limit)")
    parser.add_argument("--save-every", type=positive_int, default=50000,
                        help="save decoded sentences every N (resume granularity)")
    parser.add_argument("--filter-length-ratio", type=at_least_one, metavar="R",
                        help="optional: fall back to the reference when hypothesis and source "
                        "lengths differ by more than a factor R (off by default)")
    parser.add_argument("--filter-min-score", type=finite_float, metavar="S",
                        help="optional: fall back to the reference when the teacher's "
                        "length-normalised log-probability is below S (off by default)")
    parser.add_argument("--fp16", action="store_true", help="fairseq engine: decode in fp16 (GPU)")
    parser.add_argument("--cpu", action="store_true", help="decode on the CPU even with a GPU")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out split")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    try:
        build_kd_split(
            args.data, args.teacher_path, args.source_lang, args.target_lang, args.split,
            args.out_split, args.beam, args.lenpen, args.max_len_a, args.max_len_b,
            args.max_tokens, args.batch_size, args.save_every, args.fp16, args.cpu,
            args.overwrite, args.engine, args.quantization, args.threads, args.workers,
            Filters(args.filter_length_ratio, args.filter_min_score),
        )
    except WDSetupError as e:
        sys.exit(f"wd-kd-data: error: {e}")


if __name__ == "__main__":
    cli_main()
