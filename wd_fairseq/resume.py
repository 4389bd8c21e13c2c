"""A phase-1 run resumed by ``fairseq-train``: the checkpoint it resumes from, read once
per ``build_model``, and the checks before any work: the same teacher, and an optimizer
state that fits the generator banks."""

import json
import os
import re
from typing import Dict

import torch
from omegaconf import OmegaConf
from torch import nn

from .teacher import WDSetupError

#: A generator tensor of a phase-1 checkpoint written before generator banks.
PER_TENSOR_GENERATOR = re.compile(r"\.parametrizations\.[^.]+\.0\.generator\.")
#: The bank of every element-wise tensor in checkpoints written before element-wise banks
#: were cut by size.
ONE_ELEMENTWISE_BANK = "elementwise"


def resume_state(cfg):
    """(path, state) of the checkpoint fairseq-train is about to resume from (same
    rule as fairseq's ``load_checkpoint``), memory-mapped; None when there is none.

    ``build_model`` gets only the model config; the checkpoint options are in fairseq's
    root config, reached through OmegaConf's private ``_get_parent``: fairseq 0.12 offers
    no other way, and the task, which does see the root config, is stock."""
    root = cfg._get_parent() if OmegaConf.is_config(cfg) else None
    if root is None or "checkpoint" not in root:
        return None
    ckpt = root.checkpoint
    path = ckpt.restore_file
    if path == "checkpoint_last.pt":
        path = os.path.join(ckpt.save_dir, f"checkpoint_last{ckpt.checkpoint_suffix or ''}.pt")
    if not os.path.isfile(path):
        return None
    return path, torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def resumed_model_cfg(resume) -> dict:
    """The model config of the checkpoint being resumed (:func:`resume_state`), or {}:
    when --teacher-path is gone, its ``teacher_config`` still has the teacher."""
    return ((resume[1].get("cfg") or {}).get("model") or {}) if resume else {}


def refuse_old_optimizer_resume(cfg, resume) -> None:
    """A phase-1 checkpoint of an older wd_fairseq loads (its generators are converted to
    today's banks), but its optimizer state has one entry per old generator tensor."""
    if resume is None or cfg._get_parent().checkpoint.reset_optimizer:
        return
    path, state = resume
    keys = list(state.get("model") or {})
    if any(PER_TENSOR_GENERATOR.search(key) for key in keys):
        layout = "one generator per student tensor"
    elif f"generator_banks.{ONE_ELEMENTWISE_BANK}.generator.scale" in keys:
        layout = "one bank for every element-wise tensor"
    else:
        return
    raise WDSetupError(
        f"{path}: a phase-1 checkpoint of an older wd_fairseq ({layout}). Its generators "
        "load (converted to today's banks), its optimizer state cannot. Fix: resume with "
        "--reset-optimizer (the generators carry on; Adam, the update count and the "
        "learning-rate schedule restart), or finish the run with the wd_fairseq version "
        "that wrote it"
    )


def check_resumed_teacher(cfg, resume, path: str, teacher: nn.Module, teacher_args: Dict) -> None:
    """A resumed run (``resume``: :func:`resume_state`) keeps its teacher: refuse a
    --teacher-path whose weights or architecture options differ from its teacher."""
    model = resumed_model_cfg(resume)
    if not model.get("teacher_config"):
        return  # nothing to resume, or not a WD checkpoint
    checkpoint, state = resume
    old, new = json.loads(model["teacher_config"]), json.loads(json.dumps(teacher_args))
    options = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    tensors = teacher.state_dict()
    saved = {name: state["model"].get(f"teacher.{name}") for name in tensors}
    differ = sum(saved[name] is None or not torch.equal(tensor.to(saved[name].dtype), saved[name])
                 for name, tensor in tensors.items())
    if not options and not differ:
        return
    what = [f"{differ} of {len(tensors)} weight tensors"] if differ else []
    what += [f"architecture options ({', '.join(options)})"] if options else []
    restore_file = cfg._get_parent().checkpoint.restore_file
    restart = ("pass a new --save-dir" if restore_file == "checkpoint_last.pt" else
               f"drop --restore-file {restore_file}")
    old_path = model.get("teacher_path")
    same = old_path and os.path.abspath(old_path) == os.path.abspath(path)
    raise WDSetupError(
        f"--teacher-path {path}: this run resumes from {checkpoint}, whose teacher "
        f"({'this file as it was then' if same else old_path}) differs from it in "
        f"{' and '.join(what)}; its generators were trained on that teacher. Fix: resume with "
        f"that same teacher ({'put the file back' if same else f'--teacher-path {old_path}'}), "
        f"or {restart} to start a new run with {path}"
    )
