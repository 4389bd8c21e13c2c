"""``wd-kd-data --num-shards N --shard-id I`` and ``wd-kd-data merge``: one KD split decoded
by N independent jobs (a Slurm array, or any scheduler), then merged into exactly what a
one-machine run writes.

* **Partition.** The one-machine batch plan (``kd_decoding.batch_plan``: sources sorted by
  length, then corpus index; one length per batch); shard I decodes batches I, I+N, I+2N, ...
  Every sentence is decoded in the batch a one-machine run decodes it in, so the merged
  ``train1`` is byte-identical, and every shard gets a similar mix of short and long
  sources (similar run times). Sources too long for the teacher (recorded, not decoded)
  belong to shard 0.
* **Files.** Shard I writes only under ``DATA/kd-SPLIT/shard-I-of-N/``: its manifest (the
  run's settings plus ``num_shards``), its shards, its own CTranslate2 conversion and, once
  every sentence of it is saved, ``complete.json`` (its record). Jobs on machines sharing a
  file system never write the same file (directories copied together afterwards merge
  too); each resumes after a kill as a one-machine run does.
* **Consistency.** A shard job refuses, before converting or decoding, settings that differ
  from another shard's manifest (naming the file, the setting and its flag) and another
  ``--num-shards``; the merge checks every manifest again, which also catches jobs started
  at the same moment with different settings. The merge decodes nothing and may run on
  another kind of machine: the engine, device and quantization are the shards' (equal in
  all), compared with its own only where its flags name them.
* **Merge.** Every shard complete and consistent, else a refusal naming the shards and the
  command that finishes them; then ``write_kd_split`` as one machine, and the shard
  directories go. The summary equals a one-machine run's except for the fields that record
  the decoding run: ``decoded_this_run`` and ``decode_seconds`` (summed over the shard jobs'
  last runs), ``sentences_per_second`` (their ratio: one job's rate), ``threads``,
  ``devices`` (shard 0's) and ``shards`` (each shard job's record).
"""

import dataclasses
import glob
import json
import logging
import os
import re
import shlex
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np

from .kd_binarize import write_kd_split
from .kd_data import KDInputs, KDJob, prepare, require_space, written_summary
from .kd_engines import ENGINE_SETTINGS, decode_job, run_record
from .kd_shards import ShardStore, merged_rows
from .teacher import WDSetupError

logger = logging.getLogger("wd_fairseq.kd_split_jobs")

#: The flag (or input) behind each manifest entry, in the order differences are reported.
FLAG_OF = {
    "teacher": "--teacher-path", "source": "DATA", "target": "DATA", "sentences": "DATA",
    "out_split": "--out-split", "lang_tokens": "--source-lang/--target-lang", "limit": "--limit",
    "engine": "--engine", "device": "--cpu, or the GPUs the job sees",
    "quantization": "--quantization", "fp16": "--fp16", "beam": "--beam", "lenpen": "--lenpen",
    "max_len_a": "--max-len-a", "max_len_b": "--max-len-b", "max_tokens": "--max-tokens",
    "batch_size": "--batch-size", "filters": "--filter-length-ratio/--filter-min-score",
    "num_shards": "--num-shards",
}


def check_shard_flags(parser, args, merge: bool) -> None:
    """--num-shards and --shard-id together (a shard job), or --num-shards alone (merge)."""
    shards, shard = args.num_shards, args.shard_id
    if merge and shards is None:
        parser.error("merge needs --num-shards N, the number of shard jobs (and their other flags)")
    if merge and shard is not None:
        parser.error("argument --shard-id: merge takes every shard. Fix: drop --shard-id")
    if not merge and (shards is None) != (shard is None):
        parser.error("argument --shard-id: needs --num-shards N" if shards is None else
                     "argument --num-shards: a shard job needs --shard-id I (0 to N-1); to merge "
                     "the shards run wd-kd-data merge DATA ... --num-shards N")
    if shard is not None and shard >= shards:
        parser.error(f"argument --shard-id: must be less than --num-shards ({shards}), got '{shard}'")


def shard_directory(work_dir: str, shard: int, shards: int) -> str:
    return os.path.join(work_dir, f"shard-{shard}-of-{shards}")


def own_share(plan: List[np.ndarray], too_long: List[np.ndarray], shard: int, shards: int):
    """(batches, too-long sources) of shard ``shard`` of ``shards``: every N-th batch of the
    plan from batch ``shard``; the too-long sources to shard 0."""
    return plan[shard::shards], too_long if shard == 0 else []


def command(job: KDJob, shard="") -> str:
    """The command line of ``job`` (flags off their defaults) as shard job ``shard`` (a
    number or a shell variable), or as the merge without one."""
    words = ["wd-kd-data"] + (["merge"] if shard == "" else []) + [job.data, "--teacher-path",
                                                                   job.teacher_path]
    for field in dataclasses.fields(KDJob):
        value = getattr(job, field.name)
        if field.name in ("data", "teacher_path", "filters", "shard_id") or value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    for flag, value in (("--filter-length-ratio", job.filters.max_length_ratio),
                        ("--filter-min-score", job.filters.min_score)):
        words += [flag, str(value)] if value is not None else []
    return " ".join(map(shlex.quote, words)) + (f" --shard-id {shard}" if shard != "" else "")


def _shown(key: str, value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict) and "path" in value:  # a file stamp
        digest = f", sha256 {value['sha256'][:12]}..." if "sha256" in value else ""
        return f"{value['path']} ({value['size']} bytes{digest})"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def mismatch(path: str, theirs: Dict, ours: Dict, who: str, fix: str,
             whom: str = "this job") -> WDSetupError:
    """The refusal of manifest ``theirs`` (file ``path``, of ``who``) against ``ours`` (of
    ``whom``), naming the first setting that differs and its flag."""
    keys = list(FLAG_OF) + sorted((set(theirs) | set(ours)) - set(FLAG_OF))
    key = next(k for k in keys if theirs.get(k) != ours.get(k))
    return WDSetupError(f"{path}: {who} was decoded with {key} {_shown(key, theirs.get(key))}; "
                        f"{whom} has {key} {_shown(key, ours.get(key))} "
                        f"({FLAG_OF.get(key, key)}). Fix: {fix}")


def check_other_shards(work_dir: str, shard: int, shards: int, expected: Dict[str, Dict]
                       ) -> Optional[str]:
    """The engine the other shards decode with (None: none started), refused where one of
    them has other settings than ``expected`` (this job's manifest per candidate engine)."""
    engine = None
    for path in sorted(glob.glob(os.path.join(work_dir, "shard-*-of-*", "manifest.json"))):
        match = re.fullmatch(r"shard-(\d+)-of-(\d+)", os.path.basename(os.path.dirname(path)))
        if match is None or int(match[1]) == shard and int(match[2]) == shards:
            continue
        if int(match[2]) != shards:
            raise WDSetupError(
                f"{path}: the split is already decoded in {match[2]} shards (--num-shards "
                f"{match[2]}); this job has --num-shards {shards}. Fix: pass --num-shards "
                f"{match[2]} to every job, or delete {work_dir}/shard-*-of-{match[2]} to start "
                f"over in {shards} shards")
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        ours = expected.get(theirs.get("engine")) or next(iter(expected.values()))
        if theirs != ours:
            raise mismatch(path, theirs, ours, f"shard {match[1]} of {shards}",
                           "give every shard job and the merge the same flags, or delete "
                           f"{work_dir}/shard-*-of-{shards} to restart all shards with these")
        engine = engine or theirs["engine"]
    return engine


def decode_shard(job: KDJob) -> Dict:
    """Decode shard ``job.shard_id`` of ``job.num_shards`` into its directory; returns its
    record (``complete.json``), or the summary where ``train1`` is already written with
    these settings."""
    shard, shards = job.shard_id, job.num_shards
    inputs = prepare(job)
    summary = written_summary(inputs)
    if summary is not None:
        return summary
    store = ShardStore(shard_directory(inputs.work_dir, shard, shards))
    expected = {e: {**m, "num_shards": shards} for e, m in inputs.manifests.items()}
    engine = check_other_shards(inputs.work_dir, shard, shards, expected)
    if engine is not None:  # (an automatic choice: the others' engine, or its refusal)
        inputs.manifests = {engine: inputs.manifests[engine]}
        inputs.job = dataclasses.replace(inputs.job, engine=engine)
    record = store.finished()
    if record is not None and record["manifest"] == store.manifest() and \
            record["manifest"] in expected.values():
        logger.info("%s: complete (%d sentences)", store.directory, record["sentences"])
        return record
    converting = "teacher conversion and " if "ctranslate2" in inputs.manifests else ""
    what = (f"shard {shard} of {shards} of the KD split '{job.out_split}' ({converting}decoded "
            f"shards in {os.path.relpath(store.directory, job.data)}/)")
    disk_full = require_space(inputs, store, 1 / shards, False, what)
    decoder, workers, decoded, seconds, manifest = decode_job(
        inputs, store, disk_full, extra={"num_shards": shards},
        select=lambda plan, too_long: own_share(plan, too_long, shard, shards))
    record = {"shard_id": shard, "sentences": int(store.done(len(inputs.source)).sum()),
              "manifest": manifest, "run": run_record(decoder, workers, decoded, seconds)}
    store.finish(record)
    logger.info("shard %d of %d complete (%d sentences in %s); once all are: %s", shard, shards,
                record["sentences"], store.directory, command(job))
    return record


def complete_shards(inputs: KDInputs, shard_command: Callable[[str], str]):
    """(stores, records) of every shard, refused where one is missing or unfinished, where
    one was made with other settings than the merge's (the engine, device and quantization
    only where the merge names them: it may run elsewhere), or than the first shard's."""
    job, work_dir, shards = inputs.job, inputs.work_dir, inputs.job.num_shards
    named = {"engine": job.engine, "quantization": job.quantization, "fp16": job.fp16 or None,
             "device": "cpu" if job.cpu else None}
    ours = {**inputs.common, "num_shards": shards,
            **{k: v for k, v in named.items() if v is not None}}
    fix = (f"pass the merge the shard jobs' flags, or delete {work_dir}/shard-*-of-{shards} "
           "and rerun every shard job with these")
    stores, records, unfinished, first = [], [], [], None
    for shard in range(shards):
        store = ShardStore(shard_directory(work_dir, shard, shards))
        manifest, path = store.manifest(), os.path.join(store.directory, "manifest.json")
        if manifest is None:
            unfinished.append((shard, "not started"))
            continue
        seen = {k: v for k, v in manifest.items() if k not in ENGINE_SETTINGS or k in ours}
        if seen != ours:
            raise mismatch(path, seen, ours, f"shard {shard} of {shards}", fix, "this merge")
        first = first or (shard, manifest)
        if manifest != first[1]:
            raise mismatch(path, manifest, first[1], f"shard {shard} of {shards}",
                           "rerun one of them with the other's flags (delete its directory "
                           "first)", f"shard {first[0]}")
        record = store.finished()
        if record is None or record["manifest"] != manifest:
            saved = int(store.done(len(inputs.source)).sum())
            unfinished.append((shard, f"{saved} sentences saved, not finished"))
            continue
        stores.append(store)
        records.append(record)
    if unfinished:
        ids = [str(shard) for shard, _ in unfinished]
        run = shard_command(ids[0]) if len(ids) == 1 else \
            f"for I in {' '.join(ids)}; do {shard_command('$I')}; done"
        raise WDSetupError(
            f"{work_dir}: {len(ids)} of {shards} shards not complete ("
            + "; ".join(f"shard {shard}: {why}" for shard, why in unfinished)
            + f"). Fix: run {run} (a killed job resumes; or resubmit those array tasks), then "
            "this merge again")
    done = np.zeros(len(inputs.source), dtype=bool)
    for store in stores:
        done |= store.done(len(inputs.source))
    if not done[:inputs.sentences].all():
        raise WDSetupError(
            f"{work_dir}: the {shards} complete shards hold {int(done.sum())} of the "
            f"{inputs.sentences} sentences. Fix: delete {work_dir}/shard-*-of-{shards} and rerun "
            "every shard job")
    return stores, records


def merged_run(records: List[Dict]) -> Dict:
    """The summary's run fields of a merge (see the module docstring)."""
    decoded = sum(r["run"]["decoded_this_run"] for r in records)
    seconds = sum(r["run"]["decode_seconds"] for r in records)
    return {**records[0]["run"], "decoded_this_run": decoded, "decode_seconds": round(seconds, 1),
            "sentences_per_second": round(decoded / seconds, 2) if decoded and seconds else None,
            "shards": [{"shard_id": r["shard_id"], "sentences": r["sentences"], **r["run"]}
                       for r in records]}


def merge_shards(job: KDJob) -> Dict:
    """``train1`` from the complete shards of ``job.num_shards`` jobs, as one machine writes
    it; returns the summary. The shard directories go once it is written."""
    inputs = prepare(job, decodes=False)
    directories = [shard_directory(inputs.work_dir, i, job.num_shards) for i in range(job.num_shards)]
    summary = written_summary(inputs)
    if summary is not None:  # (a merge killed before it removed the shard directories)
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)
        return summary
    stores, records = complete_shards(inputs, lambda shard: command(job, shard))
    inputs.out.remove_partial()
    what = (f"the KD split '{job.out_split}' (merged from {job.num_shards} shards in "
            f"{os.path.basename(inputs.work_dir)}/, then {inputs.out.pattern()})")
    disk_full = require_space(inputs, None, 0.0, True, what)
    manifest = {k: v for k, v in records[0]["manifest"].items() if k != "num_shards"}
    summary = write_kd_split(inputs, merged_rows(stores), stores, manifest, merged_run(records),
                             disk_full)
    for directory in directories:
        shutil.rmtree(directory)
    return summary
