"""``wd-kd-data DATA --teacher-path TEACHER.pt``: sequence-level KD data (docs/method.md sections 1, 7).

Decodes the source side of a data-bin's training split with the teacher (beam 6,
length penalty 1.0, top-1 hypothesis, BPE kept), restores corpus order, and writes
the result into the same data-bin as split ``train1`` with the same dictionaries:
fairseq's translation task then trains on ``train`` + ``train1`` concatenated, every
source twice. ``valid`` is not touched.

Two engines decode with the same search (``kd_decoding`` says where they differ):
CTranslate2 (the default where it is installed and converts the teacher; the
conversion is cached in ``DATA/kd-train1/ct2-QUANT/``) and fairseq's
``SequenceGenerator`` (``kd_engines`` chooses and runs them).

This module holds the job: its options (:class:`KDJob`, the CLI's flags), their checks,
and the steps from the data-bin to the written split. The shard store is ``kd_shards``,
the binarised split ``kd_binarize``.

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
import dataclasses
import glob
import json
import logging
import os
import sys
import time
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from fairseq.data import Dictionary

from .arguments import at_least_one, finite_float, nonnegative_float, nonnegative_int, positive_int
from .cli import run_cli
from .disk_space import disk_full_errors, require_free_space, tensor_sizes
from .files import atomic_writer, write_atomic
from .kd_binarize import Split, guard_reversed, infer_langs, is_placeholder, load_side, write_split
from .kd_decoding import FLAGS, OK, SOURCE_TOO_LONG, Filters, batch_plan, teacher_sanity
from .kd_engines import (ENGINES, QUANTIZATIONS, build_engine, check_quantization, check_workers,
                         ctranslate2_available, decode_into, describe, describe_fields,
                         engine_device, engine_settings, kd_task, run_workers)
from .kd_shards import ShardStore, file_stamp
from .multilingual import NO_LANG_TOKENS
from .teacher import WDSetupError

logger = logging.getLogger("wd_fairseq.kd_data")


@dataclasses.dataclass(frozen=True)
class KDJob:
    """The options of a ``wd-kd-data`` run (its flags, same names and defaults)."""

    data: str
    teacher_path: str
    source_lang: Optional[str] = None  # None: inferred from the data-bin
    target_lang: Optional[str] = None
    split: str = "train"
    out_split: str = "train1"
    beam: int = 6
    lenpen: float = 1.0
    max_len_a: float = 2.0
    max_len_b: int = 10
    max_tokens: Optional[int] = 4096
    batch_size: Optional[int] = None
    save_every: int = 50000
    fp16: bool = False
    cpu: bool = False
    overwrite: bool = False
    #: None: CTranslate2 where installed and the teacher converts, else fairseq.
    engine: Optional[str] = None
    quantization: Optional[str] = None
    threads: Optional[int] = None
    #: fairseq processes (default: one per visible GPU, or one on the CPU); CTranslate2
    #: uses every visible GPU from one process.
    workers: Optional[int] = None
    filters: Filters = Filters()


def kd_space_needed(inp: Split, source, reference, tgt_dict: Dictionary, store: ShardStore,
                    manifests: Dict, teacher_state: dict) -> int:
    """Estimated bytes that a KD run still writes: the CTranslate2 conversion (unless
    cached; while converting, a copy of the teacher (``teacher_state``) beside it), the decoded shards and
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

        weights, teacher = tensor_sizes(teacher_state["model"])
        needed = converted_bytes(weights, settings["quantization"], inp.data) + max(teacher, kd)
    return int(needed)


def check_options(job: KDJob) -> KDJob:
    """``job`` refused where its options contradict each other or name nothing, before
    the teacher is loaded; returned with its engine (``--quantization``: CTranslate2)
    and languages (inferred from the data-bin) filled in where they were left open."""
    if not os.path.isdir(job.data):
        raise WDSetupError(f"DATA {job.data}: no such directory. Fix: pass a fairseq data-bin")
    if job.out_split == job.split:
        raise WDSetupError(f"--out-split {job.out_split}: must differ from --split {job.split}")
    if job.engine is None and job.quantization is not None:
        job = dataclasses.replace(job, engine="ctranslate2")  # only it has a --quantization
    if job.engine is not None and job.engine not in ENGINES:
        raise WDSetupError(f"--engine {job.engine}: choose one of {', '.join(ENGINES)}")
    if job.engine == "ctranslate2" and not ctranslate2_available():
        raise WDSetupError("--engine ctranslate2: the ctranslate2 package is not installed. "
                           "Fix: pip install ctranslate2, or pass --engine fairseq")
    check_workers(job.workers, job.engine, chosen=True)
    if job.engine == "fairseq" and job.quantization is not None:
        raise WDSetupError(f"--quantization {job.quantization}: only for --engine ctranslate2. "
                           "Fix: drop it, or pass --engine ctranslate2 (fairseq: --fp16)")
    if job.quantization is not None:
        check_quantization(job.quantization, engine_device(job.cpu, "ctranslate2"))
    if not os.path.isfile(job.teacher_path):
        raise WDSetupError(
            f"--teacher-path {job.teacher_path}: no such file. Fix: pass the path of an existing "
            "fairseq checkpoint (.pt)"
        )
    if job.source_lang is None or job.target_lang is None:
        source_lang, target_lang = infer_langs(job.data, job.split)
        job = dataclasses.replace(job, source_lang=source_lang, target_lang=target_lang)
    return job


def build_kd_split(job: KDJob) -> Dict:
    """Decode ``job.split`` of ``job.data`` with the teacher and write it as
    ``job.out_split``. Returns the summary (also written to
    ``DATA/kd-{out_split}/summary.json``)."""
    job = check_options(job)
    data, out_split = job.data, job.out_split
    source_lang, target_lang = job.source_lang, job.target_lang
    task, tokens, teacher_state = kd_task(data, job.teacher_path, source_lang, target_lang)
    inp = Split(data, job.split, source_lang, target_lang)
    out = Split(data, out_split, source_lang, target_lang)
    source, impl = load_side(inp, source_lang, task.source_dictionary)
    reference, _ = load_side(inp, target_lang, task.target_dictionary)
    if len(source) != len(reference):
        raise WDSetupError(
            f"{inp.prefix(source_lang)} has {len(source)} sentences but "
            f"{inp.prefix(target_lang)} has {len(reference)}. Fix: re-binarise the "
            "split from parallel text files with equal line counts"
        )
    candidates = [job.engine] if job.engine else [e for e in ENGINES
                                                  if e == "fairseq" or ctranslate2_available()]
    common = {
        "teacher": file_stamp(job.teacher_path, content_hash=True),
        "source": file_stamp(inp.prefix(source_lang) + ".bin"),
        "target": file_stamp(inp.prefix(target_lang) + ".bin"),
        "sentences": len(source), "out_split": out_split,
        "beam": job.beam, "lenpen": job.lenpen, "max_len_a": job.max_len_a,
        "max_len_b": job.max_len_b, "max_tokens": job.max_tokens, "batch_size": job.batch_size,
        "filters": job.filters._asdict(),
    }
    if tokens != NO_LANG_TOKENS:
        common["lang_tokens"] = tokens._asdict()
    manifests = {e: {**common, **engine_settings(e, engine_device(job.cpu, e), job.quantization,
                                                 job.fp16)}
                 for e in candidates}
    # a multilingual data-bin holds several directions: one work directory each
    work_dir = f"kd-{out_split}" + (f".{source_lang}-{target_lang}" if tokens != NO_LANG_TOKENS else "")
    store = ShardStore(os.path.join(data, work_dir))
    summary_path = os.path.join(store.directory, "summary.json")
    vocab_size = max(len(task.source_dictionary), len(task.target_dictionary))
    if out.visible() and not is_placeholder(out):
        if not job.overwrite and os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
            if summary.get("manifest") in manifests.values():
                logger.info("%s: up to date", out.prefix(source_lang))
                guard_reversed(out, impl, vocab_size)
                return summary
        if not job.overwrite:
            raise WDSetupError(
                f"{out.prefix(source_lang)}.idx exists (from another teacher, data or "
                f"settings). Fix: pass --overwrite to replace split '{out_split}', or "
                "choose another --out-split"
            )
    for stale in glob.glob(os.path.join(data, f".kd-tmp.{out_split}.*")):
        os.remove(stale)

    needed = kd_space_needed(inp, source, reference, task.target_dictionary, store, manifests,
                             teacher_state)
    converting = "teacher conversion and " if "ctranslate2" in manifests else ""
    what = (f"the KD split '{out_split}' ({converting}decoded shards in {work_dir}/, then "
            f"{out_split}.{source_lang}-{target_lang}.{{{source_lang},{target_lang}}}.*)")
    fix = (f"free space on the file system of {data} (or move the data-bin to a bigger one) and "
           f"rerun: the decoded shards in {store.directory} are kept and the run resumes")
    require_free_space(data, needed, what, fix)

    def disk_full():  # (files.atomic_writer removes its own temporary files)
        partial = [os.path.join(data, f".kd-tmp.{out_split}.*")]
        return disk_full_errors(data, needed, what, fix, partial)

    os.makedirs(store.directory, exist_ok=True)
    decoder = build_engine(job, candidates, manifests, task, tokens, store.directory, teacher_state)
    del teacher_state  # (the engine holds what it needs: a model or its conversion)
    manifest = manifests[decoder.name]
    workers = check_workers(job.workers, decoder.name, chosen=job.engine is not None,
                            cuda=decoder.name == "fairseq" and decoder.device.type == "cuda")
    store.open(manifest)
    done = store.done(len(source))
    max_source = decoder.max_positions()[0]
    too_long = np.flatnonzero(source.sizes > max_source)
    plan = batch_plan(source.sizes, np.flatnonzero(source.sizes <= max_source), job.max_tokens,
                      job.batch_size)
    todo = [batch for batch in plan if not done[batch].all()]
    remaining = sum(len(b) for b in todo)
    if not done[too_long].all():
        store.save([(int(i), SOURCE_TOO_LONG, "") for i in too_long if not done[i]])
    if remaining:
        logger.info("decoding %d of %d sentences of %s with %s, beam %d, lenpen %s",
                    remaining, len(source), inp.prefix(source_lang), describe(decoder, workers),
                    job.beam, job.lenpen)
    started = time.time()
    if decoder.name == "fairseq" and workers > 1:
        devices = [f"cuda:{r}" for r in range(workers)] if decoder.device.type == "cuda" \
            else ["cpu"] * workers
        decoder.teacher.cpu()  # the workers load their own copies
        run_workers(job, store.directory, devices, todo)
    else:
        with disk_full():
            decode_into(decoder, source, todo, store, job.save_every, job.max_len_a,
                        job.max_len_b, job.filters)
    decode_seconds = time.time() - started
    done = store.done(len(source))
    if not done.all():
        raise WDSetupError(
            f"{store.directory}: shards hold {int(done.sum())} sentences, expected "
            f"{len(source)}. Fix: delete {store.directory} and rerun"
        )

    tgt_dict = task.target_dictionary
    counts = dict.fromkeys(FLAGS, 0)
    lengths = {"hypotheses": 0, "references": 0}  # tokens of the kept pairs
    text_path = os.path.join(store.directory, f"{out_split}.{target_lang}")

    def target_rows(text_file) -> Iterator[torch.Tensor]:
        for expected, (index, flag, text) in enumerate(store.merged()):
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

    with disk_full(), atomic_writer(text_path) as text_file:
        write_split(out, target_rows(text_file), inp.prefix(source_lang), impl, len(tgt_dict))
    sanity, warnings = teacher_sanity(counts, lengths["hypotheses"], lengths["references"])
    summary = {
        "sentences": len(source), "counts": counts, "teacher_sanity": sanity,
        "fallback_to_reference": len(source) - counts[OK],
        "engine": decoder.name, **describe_fields(decoder, workers),
        "decoded_this_run": remaining,
        "decode_seconds": round(decode_seconds, 1),
        "sentences_per_second": round(remaining / decode_seconds, 2) if remaining else None,
        "manifest": manifest,
    }
    with disk_full():
        write_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for shard in store.shards():  # (after the summary: a rerun finds the split up to date)
        os.remove(shard)
    with disk_full():
        guard_reversed(out, impl, vocab_size)
    logger.info("wrote %s.{%s,%s} (%d sentences; fell back to the reference for %d: %s)",
                os.path.join(data, f"{out_split}.{source_lang}-{target_lang}"), source_lang,
                target_lang, len(source), summary["fallback_to_reference"],
                ", ".join(f"{k} {v}" for k, v in counts.items() if k != OK))
    logger.info("teacher sanity: runaway rate %.1f%%, fallback rate %.1f%%, kept hypotheses %sx "
                "the references' length", 100 * sanity["runaway_rate"], 100 * sanity["fallback_rate"],
                sanity["length_ratio"])
    for warning in warnings:
        logger.warning("teacher sanity: %s", warning)
    return summary


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
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(KDJob) if f.name != "filters"}
    job = KDJob(**flags, filters=Filters(args.filter_length_ratio, args.filter_min_score))
    run_cli("wd-kd-data", lambda: build_kd_split(job))


if __name__ == "__main__":
    cli_main()
