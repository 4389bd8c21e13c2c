"""Which engine decodes a ``wd-kd-data`` job, on what, and how it runs.

The device (``--cpu``, else a GPU where the engine sees one), the CTranslate2
quantization of that device, the engine itself (an automatic choice falls back from
CTranslate2 to fairseq when the converter refuses the teacher; the conversion is cached
in the work directory), the number of decoding processes (fairseq: one per GPU;
CTranslate2 decodes on every visible GPU from one process), :func:`decode_into`, which
runs an engine over batches of the plan into the shard store, and :func:`decode_job`, which
makes the plan of a job (or of one shard job's share) and runs it, resuming.
"""

import importlib.util
import logging
import multiprocessing
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch

from .kd_binarize import Split, load_side
from .kd_decoding import (SOURCE_TOO_LONG, CTranslate2Engine, FairseqEngine, Filters, Progress,
                          batch_plan, classify, cpu_threads, hypothesis_limit)
from .kd_shards import ShardStore
from .multilingual import LangTokens, data_task, lang_tokens
from .teacher import WDSetupError, load_teacher, read_checkpoint, task_langs

if TYPE_CHECKING:
    from .kd_data import KDInputs, KDJob

logger = logging.getLogger("wd_fairseq.kd_engines")

ENGINES = ("ctranslate2", "fairseq")
#: --quantization choices of the CTranslate2 engine, by device.
QUANTIZATIONS = {"cpu": ("int8", "float32"), "cuda": ("float16", "int8_float16", "int8", "float32")}


def kd_task(data: str, teacher_path: str, source_lang: str, target_lang: str):
    """(task, language tokens, teacher state) that decode ``source_lang``-``target_lang`` of
    ``data`` with the teacher, checked against it (every engine): fairseq's translation
    task, or the teacher's own multilingual task set up for that direction. The state is
    the file read once: hand it to :func:`build_engine`, then let it go."""
    state = read_checkpoint(teacher_path, "--teacher-path")
    task = data_task(state, data, source_lang, target_lang, "--teacher-path", teacher_path)
    return task, lang_tokens(task, source_lang, target_lang), state


def ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def engine_device(cpu: bool, engine: str) -> str:
    """``cpu`` or ``cuda``: the CPU if asked, else a GPU where ``engine`` sees one."""
    if cpu:
        return "cpu"
    if engine == "ctranslate2":
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_quantization(quantization: Optional[str], device: str) -> str:
    """``quantization``, or the device's default, refused where the device lacks it."""
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


#: The manifest entries of :func:`engine_settings`.
ENGINE_SETTINGS = ("engine", "device", "quantization", "fp16")


def without_engine(manifest: Dict) -> Dict:
    """``manifest`` without the entries of :func:`engine_settings`."""
    return {k: v for k, v in manifest.items() if k not in ENGINE_SETTINGS}


def engine_settings(engine: str, device: str, quantization: Optional[str], fp16: bool) -> Dict:
    """The manifest entries that make one engine's output differ from another's."""
    if engine == "ctranslate2":
        return {"engine": engine, "device": device,
                "quantization": check_quantization(quantization, device)}
    return {"engine": engine, "device": device, "fp16": fp16}


def check_workers(workers: Optional[int], engine: Optional[str], chosen: bool,
                  cuda: bool = False) -> int:
    """The number of decoding processes: ``workers``, by default one per visible GPU for
    fairseq on ``cuda``, else 1. ``engine``: the one decoding (None: not yet known);
    ``chosen``: whether the user passed it (else it is the automatic choice)."""
    if workers is not None and workers < 1:
        raise WDSetupError(f"--workers {workers}: must be at least 1")
    if engine == "ctranslate2" and (workers or 1) > 1:
        raise WDSetupError(
            f"--workers {workers}: for --engine fairseq; "
            + ("CTranslate2 decodes on every visible GPU from one process. Fix: drop --workers"
               if chosen else "the teacher converted, so CTranslate2 decodes (on every visible "
               "GPU, from one process). Fix: drop --workers, or pass --engine fairseq"))
    if engine == "fairseq" and cuda:
        workers = workers or torch.cuda.device_count()
        if workers > torch.cuda.device_count():
            raise WDSetupError(f"--workers {workers}: only {torch.cuda.device_count()} GPUs "
                               "are visible. Fix: pass at most that many")
    return workers or 1


def build_engine(job: "KDJob", candidates: List[str], manifests: Dict, task, tokens: LangTokens,
                 work_dir: str, state: dict):
    """The first engine of ``candidates`` (each with its manifest in ``manifests``) that
    accepts the teacher (``state``: its file as :func:`kd_task` read it). An automatic
    choice falls back from CTranslate2 to fairseq when the converter refuses the teacher."""
    from .export_ctranslate2 import cached_export

    for name in candidates:
        settings = manifests[name]
        if name == "ctranslate2":
            quantization = settings["quantization"]
            try:
                cached = cached_export(job.teacher_path, os.path.join(work_dir, f"ct2-{quantization}"),
                                       job.data, quantization, settings["teacher"],
                                       "--teacher-path", task_langs(task), state=state)
            except WDSetupError as e:
                if job.engine is not None:
                    raise
                logger.info("CTranslate2 cannot take this teacher (%s); decoding with fairseq", e)
                continue
            return CTranslate2Engine(
                os.path.join(work_dir, f"ct2-{quantization}"), quantization, settings["device"],
                job.threads or cpu_threads(), job.beam, job.lenpen, job.max_len_a, job.max_len_b,
                task.source_dictionary, tokens,
                (min(cached["max_positions"][0], task.max_positions()[0]),
                 cached["max_positions"][1]))
        return fairseq_engine(job, task, tokens, torch.device(settings["device"]), state)
    raise AssertionError("fairseq is always a candidate of an automatic choice")


def fairseq_engine(job: "KDJob", task, tokens: LangTokens, device: torch.device,
                   state: dict) -> FairseqEngine:
    if device.type == "cpu" and job.threads:
        torch.set_num_threads(job.threads)
    teacher, _ = load_teacher(job.teacher_path, task, state=state)
    teacher = teacher.to(device).eval()
    if job.fp16:
        teacher = teacher.half()
    return FairseqEngine(teacher, task, tokens, job.beam, job.lenpen, job.max_len_a,
                         job.max_len_b, device)


def decode_into(decoder, source, batches: List[np.ndarray], store: ShardStore, save_every: int,
                max_len_a: float, max_len_b: int, filters: Filters = Filters(),
                label: str = "") -> None:
    """Decode ``batches`` (arrays of corpus indices) of ``source`` with ``decoder``, saving
    a shard every ``save_every`` sentences (whole batches only)."""
    max_target = decoder.max_positions()[1]
    progress = Progress(sum(len(b) for b in batches),
                        sum(int(source.sizes[b].sum()) for b in batches), label)
    rows = []
    for hypotheses in decoder.translate(source, batches):
        for index, tokens, score in hypotheses:
            size = int(source.sizes[index])
            limit = hypothesis_limit(size, decoder.tokens, max_len_a, max_len_b, max_target)
            flag = classify(tokens, limit, size - 1, score, filters)
            rows.append((index, flag, " ".join(tokens)))
        progress.update(len(hypotheses), sum(int(source.sizes[i]) for i, _, _ in hypotheses))
        if len(rows) >= save_every:
            store.save(rows)
            rows = []
    if rows:
        store.save(rows)


def decode_job(inputs: "KDInputs", store: ShardStore, disk_full: Callable,
               extra: Optional[Dict] = None, select: Optional[Callable] = None):
    """Decode the job's sentences into ``store`` (resuming what it holds with the same
    manifest, ``extra`` added to it), or only those ``select(plan, too_long)`` keeps (each
    a list of arrays of corpus indices). Returns (engine, workers, sentences decoded now,
    seconds, manifest)."""
    job, source = inputs.job, inputs.source
    os.makedirs(store.directory, exist_ok=True)
    decoder = build_engine(job, list(inputs.manifests), inputs.manifests, inputs.task,
                           inputs.tokens, store.directory, inputs.teacher_state)
    inputs.teacher_state = None  # (the engine holds what it needs: a model or its conversion)
    manifest = {**inputs.manifests[decoder.name], **(extra or {})}
    workers = check_workers(job.workers, decoder.name, chosen=job.engine is not None,
                            cuda=decoder.name == "fairseq" and decoder.device.type == "cuda")
    store.open(manifest)
    done = store.done(len(source))
    sizes = source.sizes[:inputs.sentences]
    max_source = decoder.max_positions()[0]
    plan = batch_plan(source.sizes, np.flatnonzero(sizes <= max_source), job.max_tokens,
                      job.batch_size)
    too_long = [np.flatnonzero(sizes > max_source)]
    if select is not None:
        plan, too_long = select(plan, too_long)
    owned = np.concatenate([np.zeros(0, dtype=np.int64), *plan, *too_long])
    todo = [batch for batch in plan if not done[batch].all()]
    remaining = sum(len(b) for b in todo)
    recorded = [(int(i), SOURCE_TOO_LONG, "") for batch in too_long for i in batch if not done[i]]
    if recorded:
        store.save(recorded)
    if remaining:
        logger.info("decoding %d of %d sentences of %s with %s, beam %d, lenpen %s", remaining,
                    len(owned), inputs.inp.prefix(job.source_lang),
                    describe(decoder, workers), job.beam, job.lenpen)
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
    seconds = time.time() - started
    done = store.done(len(source))
    if not done[owned].all():
        raise WDSetupError(
            f"{store.directory}: shards hold {int(done[owned].sum())} of the {len(owned)} "
            f"sentences they should. Fix: delete {store.directory} and rerun"
        )
    return decoder, workers, remaining, seconds, manifest


def run_workers(job: "KDJob", directory: str, devices: List[str],
                batches: List[np.ndarray]) -> None:
    """One fairseq process per device on every ``len(devices)``-th batch of the plan,
    saving into the shard store ``directory``."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_fairseq_worker,
                                 args=(job, directory, worker, device, batches[worker::len(devices)]))
                 for worker, device in enumerate(devices)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [(w, p.exitcode) for w, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise WDSetupError(
            f"{directory}: decoding process(es) (worker, exit code) {failed} failed; "
            "their errors are above. Fix: correct the cause and rerun: finished shards are kept"
        )


def _fairseq_worker(job: "KDJob", directory: str, worker: int, device: str,
                    batches: List[np.ndarray]) -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    task, tokens, state = kd_task(job.data, job.teacher_path, job.source_lang, job.target_lang)
    split = Split(job.data, job.split, job.source_lang, job.target_lang)
    source, _ = load_side(split, job.source_lang, task.source_dictionary)
    engine = fairseq_engine(job, task, tokens, torch.device(device), state)
    del state
    decode_into(engine, source, batches, ShardStore(directory, worker), job.save_every,
                job.max_len_a, job.max_len_b, job.filters, label=f"worker {worker} ({device}): ")


def describe_fields(engine, workers: int = 1) -> Dict:
    """The summary's record of what decoded: quantization, device(s), CPU threads."""
    if engine.name == "ctranslate2":
        return {"quantization": engine.compute_type, "device": engine.device,
                "devices": engine.devices, "threads": engine.threads}
    return {"quantization": "float16" if next(engine.teacher.parameters()).dtype == torch.float16
            else "float32", "device": engine.device.type,
            "devices": list(range(workers)) if engine.device.type == "cuda" or workers > 1
            else [0],
            "threads": torch.get_num_threads() if engine.device.type == "cpu" else None}


def run_record(decoder, workers: int, decoded: int, seconds: float) -> Dict:
    """The summary's record of a decoding run: engine, device(s), threads, speed."""
    return {"engine": decoder.name, **describe_fields(decoder, workers),
            "decoded_this_run": decoded, "decode_seconds": round(seconds, 1),
            "sentences_per_second": round(decoded / seconds, 2) if decoded else None}


def describe(engine, workers: int = 1) -> str:
    fields = describe_fields(engine, workers)
    threads = f", {fields['threads']} threads" if fields["threads"] else ""
    return (f"{engine.name} ({fields['quantization']} on {fields['device']} "
            f"{fields['devices']}{threads})")
