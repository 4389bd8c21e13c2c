"""Checkpoint I/O shared by the tools that write a stock student (wd-materialize,
wd-init-student, wd-trim-vocab): the stock ``transformer`` checkpoint (fp32 tensors and
plain containers, so stock fairseq loads it with ``weights_only`` and without this
plugin), its atomic save, the task of the run a checkpoint comes from, and the
``fairseq-train`` flags that rebuild the student.
"""

import argparse
import os
import shlex
from typing import Dict, List, Optional

import torch
from fairseq import tasks
from fairseq.models.transformer import TransformerModel
from omegaconf import OmegaConf, open_dict

from .disk_space import disk_full_errors, require_free_space, tensor_sizes
from .files import atomic_writer
from .teacher import WDSetupError

#: Flags phase 2 needs to rebuild exactly the materialised student (shape, dropout, ...).
PHASE2_FLAGS = (
    "dropout", "attention_dropout", "activation_dropout",
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
    "encoder_normalize_before", "decoder_normalize_before", "activation_fn",
    "encoder_learned_pos", "decoder_learned_pos", "no_scale_embedding", "layernorm_embedding",
    "no_token_positional_embeddings", "share_decoder_input_output_embed", "share_all_embeddings",
    "max_source_positions", "max_target_positions",
)


#: Settings of fairseq's multilingual task that training and decoding a student repeat.
MULTILINGUAL_TASK_FLAGS = ("lang_pairs", "encoder_langtok", "decoder_langtok", "langs", "lang_dict",
                           "lang_tok_style", "fixed_dictionary")


def _plain(value):
    """Containers of primitives only (what ``torch.load(weights_only=True)`` accepts)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def phase2_flags(student_args: Dict) -> List[str]:
    """``fairseq-train`` flags that rebuild the student as ``--arch transformer``."""
    flags = ["--arch", "transformer"]
    for name in PHASE2_FLAGS:
        value = student_args.get(name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def task_flags(task_cfg) -> List[str]:
    """The task flags a student's ``fairseq-train``/``fairseq-generate`` must repeat: none
    for the translation task, ``--task`` and the language settings for the others
    (e.g. ``translation_multi_simple_epoch``). ``task_cfg``: a run's ``cfg.task``."""
    settings = vars(task_cfg) if isinstance(task_cfg, argparse.Namespace) else dict(task_cfg)
    name = settings.get("_name") or settings.get("task")
    if name in (None, "translation"):
        return []
    flags = ["--task", name]
    for key in MULTILINGUAL_TASK_FLAGS:
        value = settings.get(key)
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(map(str, value))]
        elif value not in (None, False):
            flags += [flag, str(value)]
    return flags


def run_task(cfg, what: str, data: Optional[str] = None):
    """The task of the run that wrote a checkpoint (config ``cfg``), with its data-bin
    replaced by ``data`` if given; ``what`` names the checkpoint in errors."""
    if data is not None:
        with open_dict(cfg):
            cfg.task.data = data
    try:
        return tasks.setup_task(cfg.task)
    except FileNotFoundError as e:
        raise WDSetupError(
            f"{what}: the data-bin of its run ({cfg.task.data}) is missing "
            f"({e}). Fix: pass --data with the data-bin holding its dictionaries"
        ) from e


def training_flags(run_cfg) -> List[str]:
    """The optimizer, learning-rate schedule, criterion, batch and precision flags of the
    run whose config is ``run_cfg`` (a fairseq checkpoint's ``cfg``). Word-level KD
    becomes its stock criterion, label-smoothed cross-entropy (the authors' phase 2)."""
    def section(name):
        value = run_cfg.get(name) if run_cfg is not None else None
        return value if value is not None else {}

    optimizer, optimization = section("optimizer"), section("optimization")
    scheduler, criterion = section("lr_scheduler"), section("criterion")
    dataset, common = section("dataset"), section("common")
    flags = []
    if optimizer.get("_name"):
        flags += ["--optimizer", optimizer["_name"]]
        if optimizer["_name"] == "adam":
            betas = optimizer.get("adam_betas")
            flags += ["--adam-betas", betas if isinstance(betas, str) else f"({betas[0]},{betas[1]})"]
            flags += ["--adam-eps", str(optimizer.get("adam_eps"))]
        if optimizer.get("weight_decay"):
            flags += ["--weight-decay", str(optimizer["weight_decay"])]
    if optimization.get("lr") is not None:
        flags += ["--lr", ",".join(str(lr) for lr in optimization["lr"])]
    if scheduler.get("_name"):
        flags += ["--lr-scheduler", scheduler["_name"]]
        for key in ("warmup_updates", "warmup_init_lr", "update_offset"):
            if scheduler.get(key) is not None and scheduler[key] >= 0:
                flags += ["--" + key.replace("_", "-"), str(scheduler[key])]
    if optimization.get("clip_norm"):
        flags += ["--clip-norm", str(optimization["clip_norm"])]
    if criterion.get("_name"):
        name = criterion["_name"]
        flags += ["--criterion", "label_smoothed_cross_entropy" if name.startswith("kd_") else name]
        if criterion.get("label_smoothing") is not None:
            flags += ["--label-smoothing", str(criterion["label_smoothing"])]
    if dataset.get("max_tokens"):
        flags += ["--max-tokens", str(dataset["max_tokens"])]
    elif dataset.get("batch_size"):
        flags += ["--batch-size", str(dataset["batch_size"])]
    update_freq = optimization.get("update_freq")
    if update_freq is not None and list(update_freq) != [1]:
        flags += ["--update-freq", ",".join(map(str, update_freq))]
    if optimization.get("max_update"):
        flags += ["--max-update", str(optimization["max_update"])]
    flags += [f"--{precision}" for precision in ("fp16", "amp") if common.get(precision)]
    return flags


def print_written(student: str, flags: List[str], next_step: str, training: List[str],
                  whose: str) -> None:
    """What was written, and the complete stock fairseq-train command that trains it:
    the student's flags, then ``training``, the training flags of the run ``whose``."""
    print(f"wrote {student}")
    print(f"{next_step} (stock fairseq): fairseq-train DATA "
          + " ".join(shlex.quote(f) for f in flags)
          + f" --finetune-from-model {shlex.quote(student)} --upsample-primary 1"
          + " --data-buffer-size 0 " + " ".join(shlex.quote(f) for f in training)
          + " --save-dir SAVE_DIR")
    print(f"  (DATA: the data-bin, with the KD split train1 if there is one: --upsample-primary 1 "
          f"keeps fairseq 0.12 from breaking train + train1; the training flags are {whose}: "
          "set --lr, --warmup-updates and --max-update for this stage)")


def stock_checkpoint(stock: TransformerModel, args: Dict, run_cfg) -> dict:
    """A checkpoint of the stock ``transformer`` ``stock`` (built from ``args``), fp32,
    plain containers only; task and other settings from ``run_cfg`` (the config of the
    run it comes from)."""
    cfg = _plain(OmegaConf.to_container(run_cfg, resolve=True, enum_to_str=True))
    cfg["model"] = _plain(args)
    cfg["common"]["user_dir"] = None
    cfg["criterion"] = {"_name": "label_smoothed_cross_entropy", "label_smoothing": 0.1}
    return {
        "args": None,
        "cfg": cfg,
        "model": {k: v.float().contiguous() for k, v in stock.state_dict().items()},
        "criterion": None,
        "optimizer_history": [
            {"criterion_name": "LabelSmoothedCrossEntropyCriterion",
             "optimizer_name": "none", "lr_scheduler_state": {}, "num_updates": 0}
        ],
        "task_state": {},
        "extra_state": {
            "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "version": 2},
            "previous_training_time": 0.0,
        },
        "last_optimizer_state": None,
    }


def deployable_checkpoint(state: dict) -> dict:
    """A checkpoint fairseq-train wrote (``state``, loaded), made stock for deployment:
    fp32 weights, plain containers, no optimizer state, no plugin directory, and the
    plugin's ``inverse_sqrt_offset`` schedule named as the stock ``inverse_sqrt``."""
    cfg = _plain(state["cfg"])
    cfg["common"]["user_dir"] = None
    scheduler = cfg.get("lr_scheduler") or {}
    if scheduler.get("_name") == "inverse_sqrt_offset":  # decoding never reads the schedule
        cfg["lr_scheduler"] = {"_name": "inverse_sqrt", **{key: scheduler.get(key) for key in (
            "warmup_updates", "warmup_init_lr", "lr")}}
    return {**state, "cfg": cfg, "args": None, "last_optimizer_state": None,
            "model": {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}}


def check_output(path: str) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    if os.path.isdir(path):
        raise WDSetupError(
            f"STUDENT {path}: is a directory. Fix: give a file name, e.g. "
            f"{os.path.join(path, 'student.pt')}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise WDSetupError(
            f"STUDENT {path}: directory {directory} does not exist or is not writable. "
            "Fix: create it or choose another output path"
        )


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file next to ``path``, then rename: no partial file.
    Refused up front where the tensors do not fit on the disk."""
    check_output(path)
    directory = os.path.dirname(os.path.abspath(path))
    needed = tensor_sizes(obj)[1]
    what, fix = f"STUDENT {path}", "free space there, or choose another output path"
    require_free_space(directory, needed, what, fix)
    try:
        with disk_full_errors(directory, needed, what, fix), \
                atomic_writer(path, "wb", prefix=".wd-materialize-", suffix=".pt") as f:
            torch.save(obj, f)
    except OSError as e:
        raise WDSetupError(
            f"STUDENT {path}: writing failed ({e}); {path} was not written. "
            "Fix: free disk space or choose another output path"
        ) from e
