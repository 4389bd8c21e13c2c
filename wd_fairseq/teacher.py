"""Loading a stock fairseq translation Transformer checkpoint as the WD teacher."""

import argparse
import json
import os
import pickle
import re
from typing import Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY, build_model
from fairseq.models.transformer import TransformerModel
from omegaconf import DictConfig, OmegaConf

from .safe_loading import allow_fairseq_checkpoints, refused_global


class WDSetupError(ValueError):
    """A WD run cannot start: the message names the file, the flag and the fix."""


def read_checkpoint(path: str, flag: str) -> dict:
    """``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` with errors that say what to do."""
    if not path:
        raise WDSetupError(f"{flag} is required: pass a fairseq checkpoint (.pt)")
    if not os.path.isfile(path):
        raise WDSetupError(
            f"{flag} {path}: no such file. Fix: pass the path of an existing fairseq "
            "checkpoint (.pt)"
        )
    allow_fairseq_checkpoints()
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path)
    except pickle.UnpicklingError as e:
        refused = refused_global(e)
        if refused is None:
            raise _unreadable(path, flag, e) from e
        raise WDSetupError(
            f"{flag} {path}: holds a Python object ({refused}) that safe loading (torch.load "
            "weights_only) refuses: loading the file would run code. Fix: do not load a file "
            "you do not trust; if you trust it, re-save its contents without that object"
        ) from e
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise _unreadable(path, flag, e) from e


def _unreadable(path: str, flag: str, e: Exception) -> WDSetupError:
    keys = _keys_of_plain_torch_file(path)
    if keys is not None:
        return WDSetupError(
            f"{flag} {path}: a torch file, but not a fairseq checkpoint (no model config "
            f"'cfg' or 'args'; top-level keys: {keys}). Fix: pass a checkpoint .pt written "
            "by fairseq-train (a bare state dict does not say which model it is)"
        )
    text = str(e)
    # torch's weights_only errors open with generic advice; the cause follows this tag.
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    reason = detail.group(1) if detail else (text.splitlines()[0] if text else "")
    return WDSetupError(
        f"{flag} {path}: cannot be read as a fairseq checkpoint ({type(e).__name__}"
        f"{': ' + reason if reason else ''}). Fix: the file is truncated, corrupt or not "
        "a torch checkpoint; re-copy it or point to another one"
    )


def _keys_of_plain_torch_file(path: str) -> Optional[str]:
    """Top-level keys of a readable torch file holding a dict without a fairseq
    config (e.g. a bare state dict); None for anything else."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    if not isinstance(state, dict) or "cfg" in state or "args" in state:
        return None
    keys = [str(k) for k in list(state)[:4]]
    return ", ".join(keys) + (", ..." if len(state) > 4 else "")


def model_args(state: dict) -> dict:
    """The model configuration of a loaded checkpoint as a flat plain dict."""
    cfg = state.get("cfg")
    model = cfg.get("model") if cfg is not None else None
    if model is None:
        model = state.get("args")
    if isinstance(model, argparse.Namespace):
        return dict(vars(model))
    if isinstance(model, DictConfig):
        return OmegaConf.to_container(model, resolve=True)
    return dict(model or {})


def check_translation_transformer(args: dict, path: str, flag: str) -> str:
    """Return the arch name, or explain why the checkpoint cannot be a teacher."""
    arch = args.get("_name") or args.get("arch")
    model_cls = ARCH_MODEL_REGISTRY.get(arch)
    if model_cls is not None and getattr(model_cls, "is_wd_model", False):
        raise WDSetupError(
            f"{flag} {path}: this is a WD phase-1 checkpoint ({arch}), not a stock "
            "Transformer. Fix: run `wd-materialize` on it and use the result"
        )
    if model_cls is None or not issubclass(model_cls, TransformerModel):
        raise WDSetupError(
            f"{flag} {path}: arch '{arch}' is not a fairseq translation Transformer "
            "(--arch transformer*). Fix: pass a checkpoint trained with the "
            "translation task and a transformer arch"
        )
    return arch


def task_langs(task) -> Tuple[Optional[str], Optional[str]]:
    """The task's source and target language (None where it has none, e.g. the
    multilingual task in training); tasks keep their settings in ``cfg`` or ``args``."""
    settings = getattr(task, "cfg", None) or getattr(task, "args", None)
    return getattr(settings, "source_lang", None), getattr(settings, "target_lang", None)


def check_dictionaries(state: dict, task, path: str, flag: str = "--teacher-path") -> None:
    """The one rule for "does this checkpoint match this data" (every tool and engine):
    its embedding tables index the task's dictionaries (size), the dictionaries hold the
    symbols of those it was trained with (where that data-bin is still there) and, for
    multilingual data, its language tokens come in its own order."""
    src, tgt = task_langs(task)
    multilingual = hasattr(task, "data_manager")  # (the multilingual task)
    settings = getattr(task, "cfg", None) or getattr(task, "args", None)
    sides = (
        ("source", "src", src, task.source_dictionary, "encoder"),
        ("target", "tgt", tgt, task.target_dictionary, "decoder"),
    )
    for side, short, lang, dictionary, module in sides:
        table = state["model"].get(f"{module}.embed_tokens.weight")
        if table is None or table.shape[0] == len(dictionary):
            continue
        if multilingual:
            raise WDSetupError(_multilingual_mismatch(state, task, path, side, table.shape[0],
                                                      len(dictionary), flag))
        raise WDSetupError(
            f"{flag} {path}: its {side} vocabulary has {table.shape[0]} entries but the "
            f"data's {side} dictionary has {len(dictionary)} ({_data_dictionary(settings, lang)}). "
            f"Fix: use the data-bin it was trained with, or binarise the data with "
            f"fairseq-preprocess --{short}dict set to its dictionary"
        )
    data_dir = _teacher_data_dir(state)
    for side, short, lang, dictionary, _ in sides if data_dir else ():
        teacher_dict = os.path.join(data_dir, f"dict.{lang}.txt")
        # (a multilingual task appends its language tokens to the file's entries)
        symbols = Dictionary.load(teacher_dict).symbols if os.path.isfile(teacher_dict) else None
        if symbols is not None and symbols != dictionary.symbols[:len(symbols)]:
            raise WDSetupError(
                f"{flag} {path}: it was trained with {teacher_dict}, which differs from the "
                f"data's {side} dictionary ({_data_dictionary(settings, lang)}) in "
                f"{sum(a != b for a, b in zip(symbols, dictionary.symbols))} of its {len(symbols)} "
                "symbols. Fix: use the data-bin it was trained with, or binarise the data with "
                f"fairseq-preprocess --{short}dict {teacher_dict}"
            )
    own = _run_langs(state) if multilingual else None
    if own is not None and list(own) != list(task.langs):
        raise WDSetupError(
            f"{flag} {path}: its language tokens are those of --langs {','.join(own)}, in that "
            f"order; the multilingual task's are of {','.join(task.langs)}, so a language would "
            f"read another's token. Fix: pass --langs {','.join(own)} (or its --lang-dict)"
        )


def _data_dictionary(settings, lang: str) -> str:
    """The dictionary file a task loaded for ``lang``."""
    fixed = getattr(settings, "fixed_dictionary", None)
    return fixed or os.path.join(str(settings.data).split(":")[0], f"dict.{lang}.txt")


def _run_langs(state: dict) -> Optional[list]:
    """The language list of a multilingual checkpoint's run (fairseq's rule: --langs,
    --lang-dict or the languages of --lang-pairs), or None where it cannot be read here."""
    from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager

    from .multilingual import lang_pairs, task_settings

    run = task_settings(state["cfg"]["task"] if state.get("cfg") is not None else state.get("args"))
    langs = run.get("langs")
    run.update(langs=langs.split(",") if isinstance(langs, str) else langs,
               lang_dict=run.get("lang_dict"), lang_pairs=["-".join(p) for p in lang_pairs(run)])
    try:
        return MultilingualDatasetManager.load_langs(argparse.Namespace(**run))
    except OSError:  # its --lang-dict is not here
        return None


def _multilingual_mismatch(state: dict, task, path: str, side: str, rows: int, entries: int,
                           flag: str) -> str:
    """Why a multilingual teacher's table and the task's dictionary differ, and what to pass."""
    langs = getattr(task, "langs", None) or []
    run = state.get("cfg", {}).get("task") if state.get("cfg") is not None else state.get("args")
    nllb = bool(getattr(run, "add_data_source_prefix_tags", False))
    hint = (" The checkpoint was trained with --add-data-source-prefix-tags (fairseq's nllb branch: "
            "3 more entries after the language tokens), which this fairseq's task does not add: "
            "run wd-trim-vocab TEACHER.pt DATA OUT first (its teacher and dictionary need no tags), "
            "or use fairseq's nllb branch" if nllb else
            " Pass the teacher's own language list, in its order: --langs or --lang-dict (M2M-100: "
            "the language list of its release; --lang-pairs alone derives the languages from the "
            "pairs, which gives too few unless every language is in a pair) and its "
            "--fixed-dictionary (M2M-100: model_dict.128k.txt)")
    return (f"{flag} {path}: its {side} table has {rows} rows but the "
            f"multilingual task's dictionary has {entries} entries ({entries - len(langs)} of the "
            f"dictionary file + {len(langs)} language tokens of --langs/--lang-pairs), "
            f"{rows - entries:+d}.{hint}")


def build_teacher(args: dict, task) -> Tuple[TransformerModel, dict]:
    """A teacher-shaped stock Transformer with frozen parameters (random until
    loaded), and its args as completed by the architecture function."""
    namespace = argparse.Namespace(**args)
    teacher = build_model(namespace, task)
    teacher.requires_grad_(False)
    return teacher, json.loads(json.dumps(vars(namespace), default=str))


def load_teacher(path: str, task, flag: str = "--teacher-path",
                 state: Optional[dict] = None) -> Tuple[TransformerModel, dict]:
    """Load a stock translation Transformer (``flag`` names it in errors): the model and
    its (completed) model args. ``state``: the file as :func:`read_checkpoint` returned
    it, when the caller has read it already (each tool reads a teacher once)."""
    if state is None:
        state = read_checkpoint(path, flag)
    args = model_args(state)
    check_translation_transformer(args, path, flag)
    check_dictionaries(state, task, path, flag)
    teacher, args = build_teacher(args, task)
    try:
        teacher.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise WDSetupError(
            f"{flag} {path}: its weights do not fit its own config ({e}). "
            "Fix: pass an unmodified fairseq checkpoint"
        ) from e
    return teacher, args


def _teacher_data_dir(state: dict) -> Optional[str]:
    cfg = state.get("cfg")
    task = cfg.get("task") if cfg is not None else None
    data = getattr(task, "data", None) if task is not None else None
    if data is None and state.get("args") is not None:
        data = getattr(state["args"], "data", None)
    if isinstance(data, str) and ":" not in data and os.path.isdir(data):
        return data
    return None
