"""``wd-init-student TEACHER.pt STUDENT.pt``: a stock student whose every tensor is a
selection of the teacher's (the zero-cost baseline to compare WD against).

Student layer i is teacher layer ``layers[i]`` (``--layers first|last|spread``). Within a
layer, each axis keeps a subset of the teacher's coordinates (``--dims first|spread``),
the same subset wherever that axis appears, so the kept weights still act on the same
features:

- the residual width of each side (embeddings, every layer's inputs and outputs,
  LayerNorms, the output projection; the decoder's encoder-attention reads the
  encoder's kept coordinates);
- attention: H_S of the teacher's H_T heads, and h_S of the h_T coordinates of each
  kept head (the same ones in q, k, v and the output projection). A student head as
  wide as the teacher's keeps whole heads; the authors' stu1 (8 heads of 32 from 8 of
  64) keeps every head and half of each;
- the FFN's inner width.

Shared tables stay shared; where the teacher shares all embeddings but the student's
decoder is narrower than its encoder (one table cannot have two widths), the student
shares its decoder's input and output tables, as phase 1 does for that shape. The result is a stock ``transformer`` checkpoint for
``fairseq-train --finetune-from-model``.

``--init wd-slice`` (or ``wd-faithful``) writes instead the student WD phase 1 starts
from: its generators at step 0 (``--wd-init slice``: layer groups averaged, the first
coordinates), materialised, as phase 1 with no update would give. Trained like a
selection, it separates where WD starts from what its generator learns.
"""

import argparse
from typing import Dict, List, Tuple

import torch
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.transformer import TransformerModel

from .arguments import nonnegative_int, positive_int, probability
from .checkpoints import (check_output, phase2_flags, print_written, run_task, save_atomic,
                          stock_checkpoint, task_flags, training_flags)
from .cli import run_cli
from .model import DROPOUT_FIELDS, SHAPE_FIELDS, transformer_arg_names
from .teacher import WDSetupError, load_teacher, read_checkpoint

SELECTIONS = ("first", "last", "spread")


def select(total: int, keep: int, how: str) -> List[int]:
    """``keep`` of ``range(total)``: the first, the last, or evenly spaced ending with
    the last (``spread``)."""
    if how == "first":
        return list(range(keep))
    if how == "last":
        return list(range(total - keep, total))
    return [(i + 1) * total // keep - 1 for i in range(keep)]


def student_shape(teacher_args: Dict, flags: Dict) -> Dict:
    """Stock ``transformer`` args of the student: the teacher's, with ``flags`` (shape
    and dropout; None keeps the teacher's). Raises WDSetupError for impossible shapes."""
    args = dict(teacher_args, arch="transformer", _name="transformer")
    args.update({k: v for k, v in flags.items() if v is not None})
    args.update(decoder_input_dim=args["decoder_embed_dim"],
                decoder_output_dim=args["decoder_embed_dim"], encoder_layers_to_keep=None,
                decoder_layers_to_keep=None, encoder_embed_path=None, decoder_embed_path=None)
    for side in ("encoder", "decoder"):
        for what in ("layers", "embed_dim", "ffn_embed_dim", "attention_heads"):
            name = f"{side}_{what}"
            if not 1 <= args[name] <= teacher_args[name]:
                raise WDSetupError(
                    f"--{name.replace('_', '-')} {args[name]}: a selected student needs between "
                    f"1 and the teacher's {teacher_args[name]}. Fix: pick a value in that range")
        dim, heads = args[f"{side}_embed_dim"], args[f"{side}_attention_heads"]
        teacher_head = teacher_args[f"{side}_embed_dim"] // teacher_args[f"{side}_attention_heads"]
        if dim % heads or dim // heads > teacher_head:
            raise WDSetupError(
                f"--{side}-attention-heads {heads} with --{side}-embed-dim {dim}: student heads "
                f"must divide the width and be at most the teacher's head width {teacher_head}. "
                f"Fix: use at least {-(-dim // teacher_head)} heads that divide {dim}")
    if args.get("share_all_embeddings") and args["encoder_embed_dim"] != args["decoder_embed_dim"]:
        # one table cannot have two widths: the decoder keeps its input and output tied,
        # as phase 1 does for this shape (--share-decoder-input-output-embed)
        args.update(share_all_embeddings=False, share_decoder_input_output_embed=True)
    return args


def coordinates(teacher_args: Dict, args: Dict, dims: str) -> Dict[str, List[int]]:
    """Kept teacher coordinates per axis: ``{side}`` (residual), ``{side}_attn``
    (attention inner, head by head), ``{side}_ffn``."""
    kept = {}
    for side in ("encoder", "decoder"):
        t_dim, s_dim = teacher_args[f"{side}_embed_dim"], args[f"{side}_embed_dim"]
        t_heads, s_heads = teacher_args[f"{side}_attention_heads"], args[f"{side}_attention_heads"]
        t_head, s_head = t_dim // t_heads, s_dim // s_heads
        within = select(t_head, s_head, dims)
        kept[side] = select(t_dim, s_dim, dims)
        kept[f"{side}_attn"] = [h * t_head + j for h in select(t_heads, s_heads, dims)
                                for j in within]
        kept[f"{side}_ffn"] = select(teacher_args[f"{side}_ffn_embed_dim"],
                                     args[f"{side}_ffn_embed_dim"], dims)
    return kept


def axes(key: str) -> List[str]:
    """The axes (``coordinates`` names, or ``"all"``) of a stock transformer tensor."""
    side, rest = key.split(".", 1)
    if rest in ("embed_tokens.weight", "embed_positions.weight", "output_projection.weight"):
        return ["all", side]
    if rest.startswith("layers."):
        rest = rest.split(".", 2)[2]
    module, what = rest.rsplit(".", 1)
    attention = f"{side}_attn"
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "encoder_attn.q_proj"):
        return [attention, side][: 2 if what == "weight" else 1]
    if module in ("encoder_attn.k_proj", "encoder_attn.v_proj"):  # read the encoder's output
        return [attention, "encoder"][: 2 if what == "weight" else 1]
    if module in ("self_attn.out_proj", "encoder_attn.out_proj"):
        return [side, attention][: 2 if what == "weight" else 1]
    if module == "fc1":
        return [f"{side}_ffn", side][: 2 if what == "weight" else 1]
    if module == "fc2":
        return [side, f"{side}_ffn"][: 2 if what == "weight" else 1]
    return [side]  # LayerNorms


def teacher_key(key: str, layers: Dict[str, List[int]]) -> str:
    """The teacher tensor a student tensor is selected from (its layer mapped)."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        parts[2] = str(layers[parts[0]][int(parts[2])])
    return ".".join(parts)


def selected_state(teacher: Dict[str, torch.Tensor], student: Dict[str, torch.Tensor],
                   layers: Dict[str, List[int]], kept: Dict[str, List[int]]) -> Dict:
    """Every floating tensor of ``student`` (its keys and shapes) selected from ``teacher``;
    other entries (version buffers, position buffers) are the student's own."""
    out = {}
    for key, value in student.items():
        if not value.is_floating_point() or key.endswith(("._float_tensor", ".version")):
            out[key] = value
            continue
        tensor = teacher[teacher_key(key, layers)]
        for dim, axis in enumerate(axes(key)):
            if axis != "all":
                tensor = tensor.index_select(dim, torch.tensor(kept[axis]))
        assert tensor.shape == value.shape, (key, tensor.shape, value.shape)
        out[key] = tensor.clone()
    return out


def init_student(teacher_path: str, student_path: str, flags: Dict, layers: str = "spread",
                 dims: str = "first", data: str = None) -> Tuple[List[str], List[str]]:
    """Write the selected student of ``teacher_path``; return its phase-2 style flags and
    the teacher run's training flags."""
    check_output(student_path)
    state = read_checkpoint(teacher_path, "TEACHER")
    cfg = state["cfg"]
    task = run_task(cfg, f"TEACHER {teacher_path}", data)
    teacher, teacher_args = load_teacher(teacher_path, task, "TEACHER", state=state)
    teacher_args = {k: v for k, v in teacher_args.items() if k in transformer_arg_names()}
    args = student_shape(teacher_args, flags)
    student = TransformerModel.build_model(argparse.Namespace(**args), task)
    layer_map = {side: select(teacher_args[f"{side}_layers"], args[f"{side}_layers"], layers)
                 for side in ("encoder", "decoder")}
    with torch.no_grad():
        student.load_state_dict(selected_state(
            teacher.state_dict(), student.state_dict(), layer_map,
            coordinates(teacher_args, args, dims)), strict=True)
    save_atomic(stock_checkpoint(student, args, cfg), student_path)
    return task_flags(cfg.task) + phase2_flags(args), training_flags(cfg)


def wd_start(teacher_path: str, student_path: str, flags: Dict, wd_init: str, seed: int = 1,
             data: str = None) -> Tuple[List[str], List[str]]:
    """Write the student WD phase 1 starts from (``--wd-init wd_init``, generator
    initialisation drawn with ``seed``) to ``student_path``; return what
    :func:`init_student` returns. The teacher is read twice (here and by the model)."""
    from omegaconf import OmegaConf

    from .materialize import student_checkpoint
    from .model import WDTransformerConfig, WDTransformerModel

    check_output(student_path)
    state = read_checkpoint(teacher_path, "TEACHER")
    task = run_task(state["cfg"], f"TEACHER {teacher_path}", data)
    torch.manual_seed(seed)
    cfg = OmegaConf.structured(WDTransformerConfig(
        teacher_path=teacher_path, wd_init=wd_init, **{k: v for k, v in flags.items() if v is not None}))
    model = WDTransformerModel.build_model(cfg, task).float().eval()
    with torch.no_grad():
        save_atomic(student_checkpoint(model, task, state), student_path)
    return task_flags(state["cfg"].task) + phase2_flags(model.student_args), training_flags(state["cfg"])


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wd-init-student",
        description="Write a stock fairseq `transformer` student whose every tensor is a "
        "selection of a teacher's (layers, heads, rows and columns).")
    parser.add_argument("teacher", metavar="TEACHER.pt", help="stock fairseq translation Transformer")
    parser.add_argument("student", metavar="STUDENT.pt", help="output: stock transformer checkpoint")
    parser.add_argument("--arch", default="wd_transformer",
                        choices=("wd_transformer", "wd_transformer_stu1", "wd_transformer_stu2"),
                        help="a student preset (the flags below override it; default: none)")
    for name in SHAPE_FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), type=positive_int,
                            help="student shape (default: the preset's, else the teacher's)")
    for name in DROPOUT_FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), type=probability,
                            help="student dropout (default: the teacher's)")
    parser.add_argument("--layers", choices=SELECTIONS, default="spread",
                        help="teacher layers kept: first, last, or spread (evenly spaced, "
                        "ending with the last; default)")
    parser.add_argument("--dims", choices=("first", "spread"), default="first",
                        help="coordinates kept along each axis (default: first)")
    parser.add_argument("--init", choices=("selection", "wd-slice", "wd-faithful"), default="selection",
                        help="selection (default): the selection above; wd-slice / wd-faithful: the "
                        "student WD phase 1 starts from with --wd-init slice / faithful")
    parser.add_argument("--seed", type=nonnegative_int, default=1,
                        help="--init wd-faithful: the seed of its random projections (default: 1)")
    parser.add_argument("--data", help="data-bin with the dictionaries (default: the teacher's run's)")
    args = parser.parse_args(argv)
    flags = {name: getattr(args, name) for name in SHAPE_FIELDS + DROPOUT_FIELDS}
    if args.arch != "wd_transformer":  # the preset fills in what the flags leave unset
        preset = argparse.Namespace(**flags)
        ARCH_CONFIG_REGISTRY[args.arch](preset)
        flags = vars(preset)
    if args.init == "selection":
        phase2, training = run_cli("wd-init-student", lambda: init_student(
            args.teacher, args.student, flags, args.layers, args.dims, args.data))
    else:
        phase2, training = run_cli("wd-init-student", lambda: wd_start(
            args.teacher, args.student, flags, args.init[len("wd-"):], args.seed, args.data))
    print_written(args.student, phase2, "train it", training, "the teacher's")


if __name__ == "__main__":
    cli_main()
