"""``wd-export-ct2 STUDENT.pt OUTPUT_DIR``: a stock student checkpoint as a CTranslate2 model.

The weights are mapped by CTranslate2's own fairseq converter
(``ctranslate2.converters.FairseqConverter``), unchanged. That converter reads the
legacy ``args`` Namespace of a checkpoint, while ``wd-materialize`` writes the config
as plain containers (so that stock fairseq loads it with ``weights_only``): the
student is handed to the converter as a temporary legacy-format copy whose Namespace
joins the checkpoint's task and model configs.

Accepted shapes (CTranslate2 4.8): any encoder/decoder depth, widths (a decoder
narrower than the encoder, as in stu1, included), FFN widths and embedding sharing.
The converter refuses different encoder and decoder attention-head counts (its
``TransformerSpec`` takes one ``num_heads``) and, from the teacher's options, mixed
pre-/post-norm, activations other than relu/gelu/swish and
``--no-token-positional-embeddings``.
"""

import argparse
import glob
import json
import os
import shutil
import tempfile
from typing import Optional, Tuple

import torch
from fairseq.data.data_utils import infer_language_pair

from fairseq.models.transformer import DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS

from .cli import run_cli
from .disk_space import disk_full_errors, require_free_space, tensor_sizes
from .multilingual import (MULTILINGUAL_TASK, data_task, direction_task, is_multilingual, lang_pairs,
                           lang_tokens, task_settings)
from .teacher import WDSetupError, check_translation_transformer, model_args, read_checkpoint

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                 "float16", "bfloat16", "float32")
#: Bytes a weight takes in a converted model, by quantization.
WEIGHT_BYTES = {"int8": 1, "int8_float32": 1, "int8_float16": 1, "int8_bfloat16": 1, "int16": 2,
                "float16": 2, "bfloat16": 2, "float32": 4}


def converted_bytes(weights: int, quantization: str, data: str) -> int:
    """Estimated size of a CTranslate2 model of ``weights`` numbers (a tenth more for
    those kept in float32, e.g. biases, and for alignment), with the vocabularies of
    ``data``'s dictionaries."""
    vocabularies = sum(os.path.getsize(p) for p in glob.glob(os.path.join(data, "dict.*.txt")))
    return int(1.1 * weights * WEIGHT_BYTES[quantization]) + 2 * vocabularies


def _ctranslate2():
    try:
        import ctranslate2
        from ctranslate2.converters import FairseqConverter
    except ImportError as e:
        raise WDSetupError(
            f"wd-export-ct2 needs the ctranslate2 package ({e}). Fix: "
            "pip install 'wd_fairseq[deploy]'"
        ) from e
    return ctranslate2.__version__, FairseqConverter


def converter_args(state: dict, path: str, data: Optional[str], flag: str = "STUDENT",
                   direction: Tuple[Optional[str], Optional[str]] = (None, None)) -> argparse.Namespace:
    """The legacy ``args`` the converter reads: the checkpoint's task and model
    configs in one Namespace, with ``data`` pointing at the dictionaries. A multilingual
    model is converted for ``direction`` (default: its first language pair); its
    vocabulary, language tokens included, serves every direction."""
    args = model_args(state)
    check_translation_transformer(args, path, flag)
    task = task_settings(state["cfg"]["task"])
    source = "--data" if data else f"{flag} {path}: its run's data-bin"
    data = data or task.get("data")
    if not data or not os.path.isdir(data):
        raise WDSetupError(
            f"{source} {data}: no such directory. Fix: pass --data with the data-bin "
            "holding the dictionaries the student was trained with"
        )
    if is_multilingual(task):
        src, tgt = direction if None not in direction else lang_pairs(task)[0]
        run = data_task(state, data, src, tgt, flag, path)
        return argparse.Namespace(**{**vars(run.args), **args, "task": MULTILINGUAL_TASK,
                                     "data": data, "source_lang": src, "target_lang": tgt})
    src, tgt = task.get("source_lang"), task.get("target_lang")
    if src is None or tgt is None:
        src, tgt = infer_language_pair(data)
    for lang in (src, tgt):
        dict_path = os.path.join(data, f"dict.{lang}.txt")
        if lang is None or not os.path.isfile(dict_path):
            raise WDSetupError(
                f"--data {data}: no dictionary {dict_path}. Fix: pass the data-bin "
                "written by fairseq-preprocess for this student"
            )
    data_task(state, data, src, tgt, flag, path)
    task_name = task.pop("_name")
    return argparse.Namespace(**{**task, **args, "task": task_name, "data": data,
                                 "source_lang": src, "target_lang": tgt})


def check_heads(args: argparse.Namespace, path: str, version: str, flag: str = "STUDENT") -> None:
    """The one shape of a WD student that the converter refuses."""
    encoder, decoder = args.encoder_attention_heads, args.decoder_attention_heads
    if encoder != decoder:
        raise WDSetupError(
            f"{flag} {path}: {encoder} encoder and {decoder} decoder attention heads. "
            f"CTranslate2 {version}'s fairseq converter needs equal counts (its "
            f"TransformerSpec takes one num_heads). Fix: train the WD student with "
            f"--decoder-attention-heads {encoder} (as the stu1/stu2 presets do), or serve "
            "it with fairseq-generate"
        )


def _replace_dir(new: str, target: str, scratch: str) -> None:
    """Move directory ``new`` to ``target``; an old ``target`` goes to ``scratch``."""
    if os.path.exists(target):
        os.rename(target, os.path.join(scratch, "previous"))
    os.rename(new, target)


def export(student: str, output: str, data: Optional[str] = None,
           quantization: str = "int8", force: bool = False, flag: str = "STUDENT",
           direction: Tuple[Optional[str], Optional[str]] = (None, None),
           state: Optional[dict] = None) -> Tuple[str, argparse.Namespace]:
    """Convert ``student`` (stock transformer checkpoint) to a CTranslate2 model
    directory ``output``; return the CTranslate2 version used and the converter's args.
    ``flag`` names the checkpoint in error messages; ``state``: the file as
    ``read_checkpoint`` returned it, if the caller has read it already."""
    version, FairseqConverter = _ctranslate2()
    if quantization not in QUANTIZATIONS:
        raise WDSetupError(f"--quantization {quantization}: choose one of {', '.join(QUANTIZATIONS)}")
    if os.path.exists(output) and not force:
        raise WDSetupError(
            f"OUTPUT_DIR {output} already exists. Fix: pass --force to replace it, "
            "or choose another directory"
        )
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise WDSetupError(
            f"OUTPUT_DIR {output}: directory {parent} does not exist or is not writable. "
            "Fix: create it or choose another output directory"
        )
    if state is None:
        state = read_checkpoint(student, flag)  # also allow-lists Namespace for the converter
    args = converter_args(state, student, data, flag, direction)
    check_heads(args, student, version, flag)
    weights, model_bytes = tensor_sizes(state["model"])
    needed = model_bytes + converted_bytes(weights, quantization, args.data)
    what = f"the CTranslate2 conversion of {student} (a copy of it, then the model)"
    fix = "free space on that file system (or write to another one) and rerun"
    require_free_space(parent, needed, what, fix)
    with disk_full_errors(parent, needed, what, fix):  # (the scratch directory goes first)
        with tempfile.TemporaryDirectory(prefix=".wd-export-ct2-", dir=parent) as scratch:
            legacy = os.path.join(scratch, "legacy.pt")
            torch.save({"args": args, "cfg": None, "model": state["model"]}, legacy)
            del state
            model_dir = os.path.join(scratch, "model")
            try:
                FairseqConverter(legacy, args.data).convert(model_dir, quantization=quantization)
            except ValueError as e:
                if "not supported by CTranslate2" not in str(e):
                    raise
                reasons = [line[2:] for line in str(e).splitlines() if line.startswith("- ")]
                raise WDSetupError(
                    f"{flag} {student}: CTranslate2 {version}'s fairseq converter refuses it: "
                    f"{'; '.join(reasons)}. A WD student inherits these options from its "
                    "teacher. Fix: serve this student with fairseq-generate"
                ) from e
            with open(os.path.join(model_dir, "wd_fairseq.json"), "w", encoding="utf-8") as f:
                json.dump(ct2_metadata(args), f, indent=2)  # (for wd-translate)
            _replace_dir(model_dir, output, scratch)
    return version, args


def ct2_metadata(args: argparse.Namespace) -> dict:
    """What a CTranslate2 model does not record of the fairseq model it was made from."""
    return {"source_lang": args.source_lang, "target_lang": args.target_lang,
            "max_positions": [args.max_source_positions, args.max_target_positions],
            "multilingual": args.task == MULTILINGUAL_TASK}


def usage_line(output: str, args: argparse.Namespace) -> str:
    """How to call the model exported with converter ``args``: a multilingual model's
    language tokens (of its first direction) go in front of source and target."""
    call = f"ctranslate2.Translator({output!r}).translate_batch("
    if args.task != MULTILINGUAL_TASK:  # (the converter's args: "_name" is the model's)
        return f"usage: {call}[source tokens as in the data-bin, BPE applied], beam_size=...)"
    src, tgt = args.source_lang, args.target_lang
    tokens = lang_tokens(direction_task(vars(args), args.data, src, tgt, "STUDENT"), src, tgt)
    source = f"[{tokens.source!r}, *source tokens]" if tokens.source else "[source tokens]"
    target = f", target_prefix=[[{tokens.target!r}]]" if tokens.target else ""
    drop = ", then drop the first token of each hypothesis" if tokens.target else ""
    return (f"usage ({src}-{tgt}; another direction: its language tokens): {call}[{source}]{target}, "
            f"beam_size=...){drop} (source tokens as in the data-bin, BPE applied)")


def cached_export(checkpoint: str, cache_dir: str, data: str, quantization: str,
                  identity: dict, flag: str,
                  direction: Tuple[Optional[str], Optional[str]] = (None, None),
                  state: Optional[dict] = None) -> dict:
    """``cache_dir``, the export of ``checkpoint`` (file ``identity``: size, mtime,
    content hash) with ``quantization`` and the dictionaries of ``data``, converted
    now unless it already holds exactly that. Returns its ``wd-cache.json``:
    ``{"key": ..., "max_positions": [source, target]}``.

    A conversion is written to ``cache_dir.tmp`` and renamed into place with its
    key, so an interrupted one is never taken for a finished one."""
    version, _ = _ctranslate2()
    dictionaries = sorted(glob.glob(os.path.join(data, "dict.*.txt")))
    key = {"checkpoint": identity, "quantization": quantization, "ctranslate2": version,
           "dictionaries": {os.path.basename(p): _file_stamp(p) for p in dictionaries}}
    marker = os.path.join(cache_dir, "wd-cache.json")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key and os.path.exists(os.path.join(cache_dir, "model.bin")):
            return cached
    parent, tmp = os.path.dirname(os.path.abspath(cache_dir)), cache_dir + ".tmp"
    for stale in [tmp] + glob.glob(os.path.join(parent, ".wd-export-ct2-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
    _, converted = export(checkpoint, tmp, data, quantization, force=True, flag=flag,
                          direction=direction, state=state)
    cached = {"key": key, "max_positions": [
        getattr(converted, "max_source_positions", None) or DEFAULT_MAX_SOURCE_POSITIONS,
        getattr(converted, "max_target_positions", None) or DEFAULT_MAX_TARGET_POSITIONS]}
    with open(os.path.join(tmp, "wd-cache.json"), "w", encoding="utf-8") as f:
        json.dump(cached, f, indent=2, sort_keys=True)
    if os.path.exists(cache_dir):
        shutil.rmtree(cache_dir)
    os.rename(tmp, cache_dir)
    return cached


def _file_stamp(path: str) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wd-export-ct2",
        description="Convert a stock fairseq transformer checkpoint (e.g. the output of "
        "wd-materialize, or a phase-2 checkpoint) to a CTranslate2 model directory with "
        "CTranslate2's fairseq converter.",
    )
    parser.add_argument("student", metavar="STUDENT.pt", help="stock transformer checkpoint")
    parser.add_argument("output", metavar="OUTPUT_DIR", help="CTranslate2 model directory to write")
    parser.add_argument("--data", help="data-bin with the dictionaries (default: the run's)")
    parser.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                        help="weight type stored (default: int8; float16 runs as float32 "
                        "on CPUs without fp16 support)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUTPUT_DIR")
    args = parser.parse_args(argv)
    def job():
        version, converted = export(args.student, args.output, args.data, args.quantization,
                                    args.force)
        return version, usage_line(args.output, converted)

    version, usage = run_cli("wd-export-ct2", job)
    print(f"wrote {args.output} (CTranslate2 {version}, {args.quantization})")
    print(usage)


if __name__ == "__main__":
    cli_main()
