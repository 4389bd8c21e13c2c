"""Binarised splits of a data-bin: their direction and file names, reading a side, and
writing the KD split (:func:`write_kd_split`: its files, decoded text and summary).

The target side streams from the merged shards into fairseq's mmap format
(:class:`MMapWriter`: memory does not grow with the corpus; fairseq's legacy formats go
through its builder): each kept hypothesis, or the reference where it fell back. The source
side is copied, or re-binarised from its first K sentences for a ``--limit K``. Every file goes to a temporary file
``DATA/.kd-tmp.NAME`` first and is renamed into place with the source index last: fairseq
sees the split only once all of it is complete. An empty split of the reversed direction
keeps fairseq from reading the KD split backwards (:func:`guard_reversed`).
"""

import glob
import json
import logging
import os
import struct
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from fairseq.data import Dictionary, data_utils, indexed_dataset

from .files import atomic_writer, write_atomic
from .kd_decoding import FLAGS, OK, teacher_sanity
from .kd_shards import Row, ShardStore
from .teacher import WDSetupError

if TYPE_CHECKING:
    from .kd_data import KDInputs

logger = logging.getLogger("wd_fairseq.kd_binarize")


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

    def pattern(self) -> str:
        """Its file names, for messages: ``train1.src-tgt.{src,tgt}.*``."""
        return f"{self.name}.{self.src}-{self.tgt}.{{{self.src},{self.tgt}}}.*"

    def remove_partial(self) -> None:
        """The temporary files of a killed :func:`write_split` of this split's name."""
        for stale in glob.glob(os.path.join(self.data, f".kd-tmp.{self.name}.*")):
            os.remove(stale)


def load_side(split: Split, lang: str, dictionary: Dictionary):
    """(dataset, format) of side ``lang`` of ``split``: fairseq's indexed dataset (item
    i: the token ids of sentence i, EOS included) and its impl (e.g. ``mmap``)."""
    prefix = split.prefix(lang)
    impl = indexed_dataset.infer_dataset_impl(prefix)
    dataset = data_utils.load_indexed_dataset(prefix, dictionary, impl) if impl else None
    if dataset is None:
        raise WDSetupError(
            f"{prefix}.{{bin,idx}}: not found or unreadable. Fix: binarise split "
            f"'{split.name}' with fairseq-preprocess into {split.data}"
        )
    return dataset, impl


class MMapWriter:
    """fairseq's mmap indexed dataset (``MMapIndexedDatasetBuilder``'s bytes), written
    by streaming: sizes go to a side file, not a list, so memory stays flat. The header
    comes from fairseq's private ``_HDR_MAGIC`` and ``_dtype_header_code``, so it is
    fairseq's own (test_kd_engines compares the bytes with the builder's)."""

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
                vocab_sizes: Tuple[int, int], source_sentences: Optional[int] = None) -> None:
    """Write ``out`` (target ``rows``, streamed; source copied from ``source_prefix``, or
    with ``source_sentences`` K re-binarised from its first K sentences) so that fairseq
    never sees it half-written: temporary files first, then renames with the source index
    last. ``vocab_sizes``: (source, target) dictionary sizes, which set the token dtype."""
    if out.visible():
        os.remove(out.prefix(out.src) + ".idx")
    tmp = _tmp_files(out)
    tgt_bin, tgt_idx, src_bin, src_idx = out.files()
    _write_rows(rows, tmp[tgt_bin], tmp[tgt_idx], impl, vocab_sizes[1])
    if source_sentences is not None:
        source = data_utils.load_indexed_dataset(source_prefix, None, impl)
        _write_rows((source[i] for i in range(source_sentences)), tmp[src_bin], tmp[src_idx],
                    impl, vocab_sizes[0])
    else:
        for ext, path in ((".bin", src_bin), (".idx", src_idx)):
            with open(source_prefix + ext, "rb") as f_in, open(tmp[path], "wb") as f_out:
                while chunk := f_in.read(1 << 24):
                    f_out.write(chunk)
    _put_in_place(out, tmp)


def write_kd_split(inputs: "KDInputs", rows: Iterator[Row], stores: List[ShardStore],
                   manifest: Dict, run: Dict, disk_full: Callable) -> Dict:
    """Write the output split from ``rows`` (every sentence's (index, flag, text), in corpus
    order, from ``stores``, whose shards then go), the decoded text and ``summary.json``
    (``run``: what decoded, how fast; ``manifest``: the settings). Returns the summary."""
    job, out, reference = inputs.job, inputs.out, inputs.reference
    tgt_dict = inputs.task.target_dictionary
    counts = dict.fromkeys(FLAGS, 0)
    lengths = {"hypotheses": 0, "references": 0}  # tokens of the kept pairs

    def target_rows(text_file) -> Iterator[torch.Tensor]:
        for expected, (index, flag, text) in enumerate(rows):
            assert index == expected, (index, expected)
            counts[flag] += 1
            if flag == OK:
                row = tgt_dict.encode_line(text, add_if_not_exist=False)
                lengths["hypotheses"] += len(row)
                lengths["references"] += len(reference[index])
            else:
                row = reference[index]
                text = tgt_dict.string(row)
            text_file.write(text + "\n")
            yield row

    text_path = os.path.join(inputs.work_dir, f"{job.out_split}.{job.target_lang}")
    subset = inputs.sentences if inputs.sentences < len(inputs.source) else None
    with disk_full(), atomic_writer(text_path) as text_file:
        write_split(out, target_rows(text_file), inputs.inp.prefix(job.source_lang), inputs.impl,
                    inputs.vocab_sizes(), subset)
    sentences = sum(counts.values())
    assert sentences == inputs.sentences, (sentences, inputs.sentences)
    sanity, warnings = teacher_sanity(counts, lengths["hypotheses"], lengths["references"])
    summary = {"sentences": sentences, "counts": counts, "teacher_sanity": sanity,
               "fallback_to_reference": sentences - counts[OK], **run, "manifest": manifest}
    with disk_full():
        write_atomic(inputs.summary_path(), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for store in stores:  # (after the summary: a rerun finds the split up to date)
        for shard in store.shards():
            os.remove(shard)
    with disk_full():
        guard_reversed(out, inputs.impl, max(inputs.vocab_sizes()))
    logger.info("wrote %s.{%s,%s} (%d sentences; fell back to the reference for %d: %s)",
                os.path.join(job.data, f"{job.out_split}.{job.source_lang}-{job.target_lang}"),
                job.source_lang, job.target_lang, sentences, summary["fallback_to_reference"],
                ", ".join(f"{k} {v}" for k, v in counts.items() if k != OK))
    logger.info("teacher sanity: runaway rate %.1f%%, fallback rate %.1f%%, kept hypotheses %sx "
                "the references' length", 100 * sanity["runaway_rate"], 100 * sanity["fallback_rate"],
                sanity["length_ratio"])
    for warning in warnings:
        logger.warning("teacher sanity: %s", warning)
    return summary


def _write_rows(rows: Iterator[torch.Tensor], bin_path: str, idx_path: str, impl: str,
                vocab_size: int):
    """One side of a split in format ``impl`` (mmap: streamed by :class:`MMapWriter`)."""
    if impl == "mmap":
        builder = MMapWriter(bin_path, vocab_size)
    else:
        builder = indexed_dataset.make_builder(bin_path, impl=impl, vocab_size=vocab_size)
    for row in rows:
        builder.add_item(row)
    builder.finalize(idx_path)
    return builder


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
        builder = _write_rows([], bin_path, idx_path, impl, vocab_size)
        if impl == "mmap":  # (numpy cannot map an empty file: one id that no sentence uses)
            with open(bin_path, "ab") as f:
                f.write(np.zeros(1, dtype=builder.dtype).tobytes())
    _put_in_place(reverse, tmp)
    logger.info("wrote %s.{%s,%s} with 0 sentences, so that fairseq does not read the KD split "
                "of %s-%s backwards as %s-%s's (wd-kd-data -s %s -t %s replaces it)",
                os.path.join(out.data, f"{out.name}.{reverse.src}-{reverse.tgt}"), reverse.src,
                reverse.tgt, out.src, out.tgt, reverse.src, reverse.tgt, reverse.src, reverse.tgt)
