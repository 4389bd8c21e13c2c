"""``wd-kd-data DATA --teacher-path TEACHER.pt``: sequence-level KD data (docs/method.md sections 1, 7).

Decodes the source side of a data-bin's training split with the teacher (beam 6,
length penalty 1.0, top-1 hypothesis, BPE kept), restores corpus order, and writes
the result into the same data-bin as split ``train1`` with the same dictionaries:
fairseq's translation task then trains on ``train`` + ``train1`` concatenated, every
source twice. ``valid`` is not touched.

Two engines decode with the same search (``kd_decoding`` says where they differ):
CTranslate2 (the default where it is installed and converts the teacher; the conversion
is cached in ``DATA/kd-train1/ct2-QUANT/``) and fairseq's ``SequenceGenerator``.

This module holds the job: its options (:class:`KDJob`, the CLI's flags), their checks,
its inputs read once (:class:`KDInputs`) and the one-machine run. The shard store is
``kd_shards``, the plan and the engines running it ``kd_engines``, the binarised split
``kd_binarize``; jobs on several machines (``--num-shards N --shard-id I``) and their
merge, the same split byte for byte, are ``kd_split_jobs``. ``--limit K`` decodes only
the first K sentences: ``train1`` then holds both sides of those K.

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

Over ~350 lines for a stated reason: about half of it is the command line (the job's
flags, help texts and their checks, each naming its flag and the fix). It stays with the
job: :func:`check_options` and :func:`prepare` refuse bad flags before any decoding,
``kd_engines`` and ``kd_split_jobs`` read the same :class:`KDJob`, and its fields, flags
and checks change together.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Dict, Optional, Tuple

from .arguments import at_least_one, finite_float, nonnegative_float, nonnegative_int, positive_int
from .cli import run_cli
from .disk_space import disk_full_errors, require_free_space, tensor_sizes
from .kd_binarize import (Split, guard_reversed, infer_langs, is_placeholder, load_side,
                          write_kd_split)
from .kd_decoding import SOURCE_TOO_LONG, Filters
from .kd_engines import (ENGINES, QUANTIZATIONS, check_quantization, check_workers,
                         ctranslate2_available, decode_job, engine_device, engine_settings,
                         kd_task, run_record, without_engine)
from .files import file_stamp
from .kd_shards import ShardStore
from .multilingual import NO_LANG_TOKENS, LangTokens
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
    #: Only the first ``limit`` sentences of the split (None: all of them).
    limit: Optional[int] = None
    #: One job of ``num_shards`` decoding shard ``shard_id`` (kd_split_jobs); None: all.
    num_shards: Optional[int] = None
    shard_id: Optional[int] = None


@dataclasses.dataclass
class KDInputs:
    """What each step of a job reads: the checked job, the teacher's task and language
    tokens, the teacher file as read once (``teacher_state``; None once an engine holds
    what it needs), the input and output splits, the input's two sides and format, the
    number of its sentences the job covers (``sentences``: ``--limit``, or all), the
    settings that do not depend on the engine (``common``), the engines it may use with one
    manifest each, and the work directory ``DATA/kd-SPLIT``."""

    job: KDJob
    task: object
    tokens: LangTokens
    teacher_state: Optional[dict]
    inp: Split
    out: Split
    source: object
    reference: object
    impl: str
    sentences: int
    common: Dict
    manifests: Dict[str, Dict]
    work_dir: str

    def summary_path(self) -> str:
        return os.path.join(self.work_dir, "summary.json")

    def vocab_sizes(self) -> Tuple[int, int]:
        return len(self.task.source_dictionary), len(self.task.target_dictionary)


def check_options(job: KDJob, decodes: bool = True) -> KDJob:
    """``job`` refused where its options contradict each other or name nothing, before
    the teacher is loaded (without ``decodes``, the merge: not what only decoding needs);
    returned with its engine (``--quantization``: CTranslate2) and languages (inferred
    from the data-bin) filled in where they were left open."""
    if not os.path.isdir(job.data):
        raise WDSetupError(f"DATA {job.data}: no such directory. Fix: pass a fairseq data-bin")
    if job.out_split == job.split:
        raise WDSetupError(f"--out-split {job.out_split}: must differ from --split {job.split}")
    if job.engine is None and job.quantization is not None:
        job = dataclasses.replace(job, engine="ctranslate2")  # only it has a --quantization
    if job.engine is not None and job.engine not in ENGINES:
        raise WDSetupError(f"--engine {job.engine}: choose one of {', '.join(ENGINES)}")
    if decodes and job.engine == "ctranslate2" and not ctranslate2_available():
        raise WDSetupError("--engine ctranslate2: the ctranslate2 package is not installed. "
                           "Fix: pip install ctranslate2, or pass --engine fairseq")
    check_workers(job.workers, job.engine if decodes else None, chosen=True)
    if job.engine == "fairseq" and job.quantization is not None:
        raise WDSetupError(f"--quantization {job.quantization}: only for --engine ctranslate2. "
                           "Fix: drop it, or pass --engine ctranslate2 (fairseq: --fp16)")
    if decodes and job.quantization is not None:
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


def prepare(job: KDJob, decodes: bool = True) -> KDInputs:
    """The checked job's inputs, read once: the teacher (checked against the data), the
    split's sides (refused where their line counts differ) and the manifests (without
    ``decodes``: none, only their part that does not depend on the engine or device)."""
    job = check_options(job, decodes)
    source_lang, target_lang = job.source_lang, job.target_lang
    task, tokens, teacher_state = kd_task(job.data, job.teacher_path, source_lang, target_lang)
    inp = Split(job.data, job.split, source_lang, target_lang)
    source, impl = load_side(inp, source_lang, task.source_dictionary)
    reference, _ = load_side(inp, target_lang, task.target_dictionary)
    if len(source) != len(reference):
        raise WDSetupError(
            f"{inp.prefix(source_lang)} has {len(source)} sentences but "
            f"{inp.prefix(target_lang)} has {len(reference)}. Fix: re-binarise the "
            "split from parallel text files with equal line counts"
        )
    sentences = min(job.limit or len(source), len(source))
    candidates = [job.engine] if job.engine else [e for e in ENGINES
                                                  if e == "fairseq" or ctranslate2_available()]
    common = {
        "teacher": file_stamp(job.teacher_path, content_hash=True),
        "source": file_stamp(inp.prefix(source_lang) + ".bin"),
        "target": file_stamp(inp.prefix(target_lang) + ".bin"),
        "sentences": len(source), "out_split": job.out_split,
        "beam": job.beam, "lenpen": job.lenpen, "max_len_a": job.max_len_a,
        "max_len_b": job.max_len_b, "max_tokens": job.max_tokens, "batch_size": job.batch_size,
        "filters": job.filters._asdict(),
    }
    if sentences < len(source):  # (a limit of the whole split or more is no limit)
        common["limit"] = sentences
    if tokens != NO_LANG_TOKENS:
        common["lang_tokens"] = tokens._asdict()
    manifests = {e: {**common, **engine_settings(e, engine_device(job.cpu, e), job.quantization,
                                                 job.fp16)}
                 for e in candidates} if decodes else {}
    # a multilingual data-bin holds several directions: one work directory each
    work_dir = f"kd-{job.out_split}" + (f".{source_lang}-{target_lang}"
                                        if tokens != NO_LANG_TOKENS else "")
    return KDInputs(job, task, tokens, teacher_state, inp,
                    Split(job.data, job.out_split, source_lang, target_lang), source, reference,
                    impl, sentences, common, manifests, os.path.join(job.data, work_dir))


def written_summary(inputs: KDInputs) -> Optional[Dict]:
    """The summary of the output split where it is already written with these settings
    (None: it is not there, or ``--overwrite``); refused where it is from other ones."""
    job, out = inputs.job, inputs.out
    if not out.visible() or is_placeholder(out):
        return None
    if not job.overwrite and os.path.exists(inputs.summary_path()):
        with open(inputs.summary_path(), encoding="utf-8") as f:
            summary = json.load(f)
        manifest = summary.get("manifest") or {}
        if manifest in inputs.manifests.values() or \
                not inputs.manifests and without_engine(manifest) == inputs.common:
            logger.info("%s: up to date", out.prefix(job.source_lang))
            guard_reversed(out, inputs.impl, max(inputs.vocab_sizes()))
            return summary
    if not job.overwrite:
        raise WDSetupError(
            f"{out.prefix(job.source_lang)}.idx exists (from another teacher, data or "
            f"settings). Fix: pass --overwrite to replace split '{job.out_split}', or "
            "choose another --out-split"
        )
    return None


def kd_space_needed(inputs: KDInputs, store: Optional[ShardStore], share: float,
                    writes: bool) -> int:
    """Estimated bytes that a step still writes: ``share`` of the job's decoded shards,
    less those ``store`` already holds, and the CTranslate2 conversion into ``store``
    unless cached (while converting, a copy of the teacher beside it); with ``writes``, the
    decoded text and the split (target side about the reference's size, source side
    copied). Targets count a fifth more than the references."""
    inp, sentences, tgt_dict = inputs.inp, inputs.sentences, inputs.task.target_dictionary
    fraction = sentences / len(inputs.source)
    symbols = [(len(s.encode()) + 1) * c for s, c in zip(tgt_dict.symbols[tgt_dict.nspecial:],
                                                         tgt_dict.count[tgt_dict.nspecial:])]
    bytes_per_token = sum(symbols) / max(sum(tgt_dict.count[tgt_dict.nspecial:]), 1)
    text = 1.2 * (int(inputs.reference.sizes[:sentences].sum()) - sentences) * bytes_per_token
    shards = text + sentences * (len(str(sentences)) + len(SOURCE_TOO_LONG) + 3)
    size, tgt = os.path.getsize, inp.prefix(inp.tgt)
    target = fraction * (1.2 * size(tgt + ".bin") + size(tgt + ".idx")) \
        + 4 * sentences  # (the index's side file of sizes)
    copied = fraction * sum(size(inp.prefix(inp.src) + e) for e in (".bin", ".idx"))
    kd = share * shards + (text + target + copied if writes else 0)
    kd -= sum(size(shard) for shard in store.shards()) if store else 0
    needed = kd
    settings = inputs.manifests.get("ctranslate2")
    if store and settings is not None and not os.path.exists(
            os.path.join(store.directory, f"ct2-{settings['quantization']}", "model.bin")):
        from .export_ctranslate2 import converted_bytes

        weights, teacher = tensor_sizes(inputs.teacher_state["model"])
        needed = converted_bytes(weights, settings["quantization"], inp.data) + max(teacher, kd)
    return int(needed)


def require_space(inputs: KDInputs, store: Optional[ShardStore], share: float, writes: bool,
                  what: str) -> Callable:
    """Refuse ``what`` where its file system lacks :func:`kd_space_needed`'s bytes; returns
    the context that turns a disk filling up while writing it into the same message."""
    data = inputs.job.data
    needed = kd_space_needed(inputs, store, share, writes)
    fix = (f"free space on the file system of {data} (or move the data-bin to a bigger one) and "
           f"rerun: the decoded shards in {store.directory if store else inputs.work_dir} are "
           "kept and the run resumes")
    require_free_space(data, needed, what, fix)
    partial = [os.path.join(data, f".kd-tmp.{inputs.job.out_split}.*")]
    return lambda: disk_full_errors(data, needed, what, fix, partial)


def build_kd_split(job: KDJob) -> Dict:
    """Decode ``job.split`` of ``job.data`` (its first ``job.limit`` sentences) with the
    teacher and write it as ``job.out_split``, on this machine. Returns the summary (also
    written to ``DATA/kd-{out_split}/summary.json``). Shard jobs and their merge:
    ``kd_split_jobs``."""
    inputs = prepare(job)
    summary = written_summary(inputs)
    if summary is not None:
        return summary
    inputs.out.remove_partial()
    store = ShardStore(inputs.work_dir)
    converting = "teacher conversion and " if "ctranslate2" in inputs.manifests else ""
    what = (f"the KD split '{inputs.job.out_split}' ({converting}decoded shards in "
            f"{os.path.basename(inputs.work_dir)}/, then {inputs.out.pattern()})")
    disk_full = require_space(inputs, store, 1.0, True, what)
    decoder, workers, decoded, seconds, manifest = decode_job(inputs, store, disk_full)
    return write_kd_split(inputs, store.merged(), [store], manifest,
                          run_record(decoder, workers, decoded, seconds), disk_full)


def cli_main(argv=None):
    from . import kd_split_jobs  # (it builds on this module's steps)

    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    merge = argv[:1] == ["merge"]  # (a data-bin named merge: pass ./merge)
    parser = argparse.ArgumentParser(
        prog="wd-kd-data merge" if merge else "wd-kd-data",
        description="Sequence-level KD data: decode a data-bin's training source with the "
        "teacher (CTranslate2 or fairseq's beam search) and write it into the same data-bin "
        "as split train1, which fairseq-train concatenates with train. On several machines: "
        "one job per shard (--num-shards N --shard-id I), then 'wd-kd-data merge DATA ... "
        "--num-shards N' with the same flags writes train1 as one machine would.",
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
    parser.add_argument("--limit", type=positive_int, metavar="K",
                        help="decode only the first K sentences of the split (train1 then holds "
                        "those K pairs; default: all)")
    parser.add_argument("--num-shards", type=positive_int, metavar="N",
                        help="one of N jobs (with --shard-id), or the merge of their shards")
    parser.add_argument("--shard-id", type=nonnegative_int, metavar="I",
                        help="decode shard I (0 to N-1) of --num-shards N into "
                        "DATA/kd-train1/shard-I-of-N/ (every N-th batch of the plan)")
    args = parser.parse_args(argv[merge:])
    kd_split_jobs.check_shard_flags(parser, args, merge)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(KDJob) if f.name != "filters"}
    job = KDJob(**flags, filters=Filters(args.filter_length_ratio, args.filter_min_score))
    run = kd_split_jobs.merge_shards if merge else \
        kd_split_jobs.decode_shard if job.num_shards is not None else build_kd_split
    run_cli(parser.prog, lambda: run(job))


if __name__ == "__main__":
    cli_main()
