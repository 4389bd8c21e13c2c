"""``wd-materialize PHASE1.pt STUDENT.pt``: the phase-1 WD model as a stock student.

Evaluates every generator once in fp32 and writes a checkpoint of fairseq's stock
``transformer`` with the student's explicit dimensions (docs/method.md section 5). The
file holds only tensors and plain containers, so stock fairseq loads it on any
torch, with ``weights_only`` and without this plugin.
"""

import argparse
from typing import List, Optional, Tuple

import torch
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.models.transformer import TransformerModel

from .checkpoints import (check_output, phase2_flags, print_written, run_task, save_atomic,
                          stock_checkpoint, task_flags, training_flags)
from .cli import run_cli
from .teacher import WDSetupError, model_args, read_checkpoint


def load_phase1(path: str, data: Optional[str] = None):
    """The phase-1 WD model of checkpoint ``path`` (fp32, eval mode) and its task."""
    state = read_checkpoint(path, "PHASE1")
    arch = model_args(state).get("_name") or model_args(state).get("arch")
    if not getattr(ARCH_MODEL_REGISTRY.get(arch), "is_wd_model", False):
        raise WDSetupError(
            f"PHASE1 {path}: arch '{arch}' is not a WD phase-1 model. Fix: pass a "
            "checkpoint written by fairseq-train --arch wd_transformer*"
        )
    cfg = state["cfg"]
    task = run_task(cfg, f"PHASE1 {path}", data)
    model = task.build_model(cfg.model, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    del state["model"]  # only the config is needed from here on
    return model.float().eval(), task, state


def student_checkpoint(model, task, phase1_state: dict) -> dict:
    """A stock ``transformer`` checkpoint of the generated student (fp32)."""
    stock = TransformerModel.build_model(argparse.Namespace(**model.student_args), task)
    stock.load_state_dict(model.student_state_dict(), strict=True)  # keys and shapes match
    return stock_checkpoint(stock, model.student_args, phase1_state["cfg"])


def materialize(phase1: str, student: str, data: Optional[str] = None) -> Tuple[List[str], List[str], int]:
    """Write the stock student of ``phase1`` to ``student``; return the phase-2 flags
    (the task's first, where it is not the translation task), the phase-1 run's training
    flags and its number of updates."""
    check_output(student)
    model, task, state = load_phase1(phase1, data)
    with torch.no_grad():
        checkpoint = student_checkpoint(model, task, state)
    save_atomic(checkpoint, student)
    updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0)
    return (task_flags(state["cfg"].task) + phase2_flags(model.student_args),
            training_flags(state["cfg"]), updates)


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wd-materialize",
        description="Evaluate a WD phase-1 checkpoint's generators once (fp32) and write "
        "a stock fairseq `transformer` checkpoint of the student.",
    )
    parser.add_argument("phase1", metavar="PHASE1.pt", help="checkpoint of fairseq-train --arch wd_transformer*")
    parser.add_argument("student", metavar="STUDENT.pt", help="output: stock transformer checkpoint")
    parser.add_argument("--data", help="data-bin with the dictionaries (default: the phase-1 run's)")
    args = parser.parse_args(argv)
    flags, training, updates = run_cli("wd-materialize",
                                       lambda: materialize(args.phase1, args.student, args.data))
    print_written(args.student, flags, "phase 2", training, "phase 1's")
    print(f"  (the authors restart the schedule with --warmup-updates 1000; to go on along phase 1's "
          f"inverse_sqrt curve instead: --user-dir WD --lr-scheduler inverse_sqrt_offset "
          f"--update-offset {updates} with phase 1's --lr and --warmup-updates; WD: the directory "
          "of the wd_fairseq package)")


if __name__ == "__main__":
    cli_main()
