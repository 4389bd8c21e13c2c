"""Loading a stock fairseq translation Transformer checkpoint as the WD teacher."""

import argparse
import json
import os
from typing import Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY, build_model
from fairseq.models.transformer import TransformerModel
from omegaconf import DictConfig, OmegaConf

from .safe_loading import allow_fairseq_checkpoints


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
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise WDSetupError(
            f"{flag} {path}: cannot be read as a fairseq checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Fix: the file is truncated, "
            "corrupt or not a torch checkpoint; re-copy it or point to another one"
        ) from e


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


def check_dictionaries(teacher: TransformerModel, task, path: str, data_dir: Optional[str]):
    """The teacher's embedding tables must index the data's dictionaries."""
    for side, dictionary in (("source", task.source_dictionary), ("target", task.target_dictionary)):
        table = (teacher.encoder if side == "source" else teacher.decoder).embed_tokens
        if table.num_embeddings != len(dictionary):
            raise WDSetupError(
                f"--teacher-path {path}: the teacher's {side} vocabulary has "
                f"{table.num_embeddings} entries but the data's {side} dictionary has "
                f"{len(dictionary)}. Fix: binarise the data with fairseq-preprocess "
                "--srcdict/--tgtdict set to the teacher's dictionaries"
            )
    if data_dir is None:
        return
    for side, dictionary in (("source", task.source_dictionary), ("target", task.target_dictionary)):
        lang = task.cfg.source_lang if side == "source" else task.cfg.target_lang
        teacher_dict = os.path.join(data_dir, f"dict.{lang}.txt")
        if os.path.isfile(teacher_dict) and Dictionary.load(teacher_dict).symbols != dictionary.symbols:
            raise WDSetupError(
                f"--teacher-path {path}: the teacher was trained with {teacher_dict}, "
                f"which differs from the data's {side} dictionary. Fix: binarise the data "
                f"with fairseq-preprocess --{'src' if side == 'source' else 'tgt'}dict "
                f"{teacher_dict}"
            )


def build_teacher(args: dict, task) -> Tuple[TransformerModel, dict]:
    """A teacher-shaped stock Transformer with frozen parameters (random until
    loaded), and its args as completed by the architecture function."""
    namespace = argparse.Namespace(**args)
    teacher = build_model(namespace, task)
    teacher.requires_grad_(False)
    return teacher, json.loads(json.dumps(vars(namespace), default=str))


def load_teacher(path: str, task) -> Tuple[TransformerModel, dict]:
    """Load ``--teacher-path``: the frozen teacher and its (completed) model args."""
    state = read_checkpoint(path, "--teacher-path")
    args = model_args(state)
    check_translation_transformer(args, path, "--teacher-path")
    teacher, args = build_teacher(args, task)
    check_dictionaries(teacher, task, path, _teacher_data_dir(state))
    try:
        teacher.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise WDSetupError(
            f"--teacher-path {path}: its weights do not fit its own config ({e}). "
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
