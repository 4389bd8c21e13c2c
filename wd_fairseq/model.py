"""``wd_transformer``: the phase-1 WD model (docs/method.md sections 2 and 3).

The model is a stock fairseq ``transformer`` of the student's shape. Every
student tensor is a :class:`~wd_fairseq.parametrization.GeneratedTensor`: its
share of a :class:`~wd_fairseq.parametrization.GeneratorBank`, one trainable
generator over every student tensor of one kind and shape (``model.generator_banks``),
applied to the frozen teacher tensors of each tensor's layer group. Each model
forward is one generation pass: every bank runs once. The teacher is held once,
as a frozen stock Transformer in ``model.teacher`` (never in the optimizer), so a
phase-1 checkpoint is self-contained.

Over ~350 lines on purpose: choosing every student tensor's generator, building the banks,
tying tables, converting per-tensor checkpoints and materialising in place are one job,
turning a stock Transformer into a generated one and back; split, each part would reach
into the others' state.
"""

import argparse
import json
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.nn.utils import parametrize

from .generator import (
    ElementwiseGenerator,
    MatrixGenerator,
    ParameterGenerator,
    ProjectionGenerator,
    TableGenerator,
    VectorGenerator,
    stack_members,
)
from .layer_groups import layer_groups
from .parametrization import GeneratedEmbedding, GeneratedTensor, GeneratorBank, SameAs, generate
from .resume import (ONE_ELEMENTWISE_BANK, PER_TENSOR_GENERATOR, check_resumed_teacher,
                     refuse_old_optimizer_resume, resume_state, resumed_model_cfg)
from .teacher import WDSetupError, build_teacher, load_teacher

#: Most elements of one element-wise bank (16 MiB in fp32). glibc's allocator serves blocks
#: of up to 32 MiB from its heap once it has freed one that size; each bigger block is fresh
#: pages from the kernel, and a bank's output, gradients and Adam temporaries are new
#: blocks every update: on a 2-core VM an update of the authors' encoder as one 19M-element
#: bank took 417 ms of CPU, as six banks 215 ms (benchmarks/elementwise_blocks.py).
ELEMENTWISE_BANK_ELEMENTS = 1 << 22

#: Student shape flags; any not given is the teacher's.
SHAPE_FIELDS = tuple(
    f"{side}_{what}"
    for side in ("encoder", "decoder")
    for what in ("layers", "embed_dim", "ffn_embed_dim", "attention_heads")
)
DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout")


def _student_field(what: str):
    return field(default=None, metadata={"help": f"student {what} (default: the teacher's)"})


@dataclass
class WDTransformerConfig(FairseqDataclass):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={"help": "stock fairseq translation Transformer checkpoint (the frozen teacher)"},
    )
    encoder_layers: Optional[int] = _student_field("encoder layers")
    encoder_embed_dim: Optional[int] = _student_field("encoder width")
    encoder_ffn_embed_dim: Optional[int] = _student_field("encoder FFN width")
    encoder_attention_heads: Optional[int] = _student_field("encoder attention heads")
    decoder_layers: Optional[int] = _student_field("decoder layers")
    decoder_embed_dim: Optional[int] = _student_field("decoder width")
    decoder_ffn_embed_dim: Optional[int] = _student_field("decoder FFN width")
    decoder_attention_heads: Optional[int] = _student_field("decoder attention heads")
    dropout: Optional[float] = _student_field("dropout")
    attention_dropout: Optional[float] = _student_field("attention dropout")
    activation_dropout: Optional[float] = _student_field("activation dropout")
    share_decoder_input_output_embed: bool = field(
        default=False, metadata={"help": "tie the student's decoder input and output embeddings"}
    )
    share_all_embeddings: bool = field(
        default=False,
        metadata={"help": "share the student's encoder, decoder and output tables "
                  "(needs a joined dictionary and equal encoder/decoder widths)"},
    )
    wd_init: ChoiceEnum(["faithful", "slice"]) = field(
        default="faithful",
        metadata={"help": "generator initialisation: 'faithful' (the authors': random "
                  "projections) or 'slice' (the student starts as a slice of the teacher)"},
    )
    wd_table_scale: ChoiceEnum(["token", "shared"]) = field(
        default="token",
        metadata={"help": "embedding-table generators: a scale and shift per token and "
                  "student dimension ('token', the authors': 2 x vocabulary x width "
                  "parameters) or one shared by every token ('shared': bounded for big "
                  "vocabularies)"},
    )
    teacher_config: Optional[str] = field(
        default=None,
        metadata={"help": "set automatically from --teacher-path: the teacher's model "
                  "config (JSON) that makes phase-1 checkpoints self-contained"},
    )


def transformer_arg_names() -> set:
    """The flat argument names of fairseq's legacy ``transformer`` model."""
    parser = argparse.ArgumentParser()
    TransformerModel.add_args(parser)
    return {action.dest for action in parser._actions} | {"arch", "_name"}


def student_args(cfg, teacher_args: Dict, task) -> Dict:
    """Stock ``transformer`` args of the student: the teacher's, with the given
    shape and dropout flags and the student's own embedding sharing."""
    args = dict(teacher_args)
    for name in SHAPE_FIELDS + DROPOUT_FIELDS:
        value = safe_getattr(cfg, name, None)
        if value is not None:
            args[name] = value
    share_all = bool(safe_getattr(cfg, "share_all_embeddings", False))
    share_io = share_all or bool(safe_getattr(cfg, "share_decoder_input_output_embed", False))
    args.update(
        arch="transformer",
        _name="transformer",
        decoder_input_dim=args["decoder_embed_dim"],
        decoder_output_dim=args["decoder_embed_dim"],
        share_all_embeddings=share_all,
        share_decoder_input_output_embed=share_io,
        encoder_embed_path=None,
        decoder_embed_path=None,
        encoder_layers_to_keep=None,
        decoder_layers_to_keep=None,
    )
    for side in ("encoder", "decoder"):
        layers, teacher_layers = args[f"{side}_layers"], teacher_args[f"{side}_layers"]
        if not 1 <= layers <= teacher_layers:
            raise WDSetupError(
                f"--{side}-layers {layers}: a WD student needs between 1 and the "
                f"teacher's {teacher_layers} {side} layers. Fix: pick a value in that range"
            )
        dim, heads = args[f"{side}_embed_dim"], args[f"{side}_attention_heads"]
        if heads < 1 or dim % heads:
            raise WDSetupError(
                f"--{side}-attention-heads {heads} does not divide --{side}-embed-dim "
                f"{dim}. Fix: choose heads that divide the width (e.g. {dim // 64 or 1})"
            )
    if share_all:
        if args["encoder_embed_dim"] != args["decoder_embed_dim"]:
            raise WDSetupError(
                f"--share-all-embeddings needs equal student widths, got "
                f"--encoder-embed-dim {args['encoder_embed_dim']} and --decoder-embed-dim "
                f"{args['decoder_embed_dim']}. Fix: drop the flag (or use "
                "--share-decoder-input-output-embed) or make the widths equal"
            )
        if task.source_dictionary != task.target_dictionary:
            raise WDSetupError(
                "--share-all-embeddings needs a joined dictionary. Fix: binarise with "
                "fairseq-preprocess --joined-dictionary, or drop the flag"
            )
    return args


def _record_teacher_config(cfg, teacher_config: str) -> None:
    """Store the teacher's config in the model cfg that the trainer saves.

    fairseq may hand ``build_model`` a merged copy of ``cfg.model``; writing to the
    root config's ``model`` too makes the saved checkpoint carry the teacher config.
    The root is reached through OmegaConf's private ``_get_parent`` (see
    :func:`~wd_fairseq.resume.resume_state`: fairseq 0.12 offers no other way).
    """
    targets = [cfg]
    if OmegaConf.is_config(cfg):
        root = cfg._get_parent()
        if root is not None and "model" in root and root.model is not cfg:
            targets.append(root.model)
    for target in targets:
        if OmegaConf.is_config(target):
            with open_dict(target):
                target.teacher_config = teacher_config
        else:
            setattr(target, "teacher_config", teacher_config)


class WDTransformerDecoder(TransformerDecoderBase):
    """The stock decoder, except that reordering the incremental state (every beam
    search step) skips the parametrization modules: they keep no state, and
    visiting them costs more than the decoder's own modules do."""

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        for module in _without_parametrizations(self):
            if hasattr(module, "reorder_incremental_state"):
                result = module.reorder_incremental_state(incremental_state, new_order)
                if result is not None:
                    incremental_state = result


def _without_parametrizations(module: nn.Module):
    """``module`` and its submodules, except those inside ``parametrizations``."""
    yield module
    for name, child in module.named_children():
        if name != "parametrizations":
            yield from _without_parametrizations(child)


@register_model("wd_transformer", dataclass=WDTransformerConfig)
class WDTransformerModel(TransformerModel):
    """Phase-1 WD model: a stock Transformer student whose tensors are generated
    from the frozen teacher in ``self.teacher``."""

    is_wd_model = True

    @classmethod
    def add_args(cls, parser):
        gen_parser_from_dataclass(parser, WDTransformerConfig(), delete_default=True)

    @classmethod
    def build_model(cls, cfg, task):
        teacher_config = safe_getattr(cfg, "teacher_config", None)
        path = safe_getattr(cfg, "teacher_path", None)
        resume = None
        if teacher_config is None:  # a command line, not a checkpoint
            resume = resume_state(cfg)
            refuse_old_optimizer_resume(cfg, resume)
            if not (path and os.path.isfile(path)):
                teacher_config = resumed_model_cfg(resume).get("teacher_config")
        if teacher_config is not None:
            # From a checkpoint: teacher weights come with the state dict.
            teacher, teacher_args = build_teacher(json.loads(teacher_config), task)
            loaded = False
        else:
            teacher, teacher_args = load_teacher(path, task)
            loaded = True
        teacher_args = {k: v for k, v in teacher_args.items() if k in transformer_arg_names()}
        if loaded:
            check_resumed_teacher(cfg, resume, path, teacher, teacher_args)
        _record_teacher_config(cfg, json.dumps(teacher_args, sort_keys=True))
        args = student_args(cfg, teacher_args, task)
        model = super().build_model(argparse.Namespace(**args), task)
        model.student_args = args
        model.attach_teacher(teacher, teacher_args, safe_getattr(cfg, "wd_table_scale", "token"))
        if loaded and safe_getattr(cfg, "wd_init", "faithful") == "slice":
            model.start_as_slice()
        return model

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return WDTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    # -- generators ---------------------------------------------------------------

    def attach_teacher(self, teacher: TransformerModel, teacher_args: Dict,
                       table_scale: str = "token") -> None:
        """Replace every student tensor by its share of a generator bank reading
        ``teacher`` (``table_scale``: see ``--wd-table-scale``).

        Each bank's members draw their random start in the student's tensor order: the same
        values as one generator per tensor would get from the same seed.
        """
        student = list(self.named_parameters(remove_duplicate=False))
        self.teacher = teacher
        teacher_tensors = dict(teacher.named_parameters(remove_duplicate=False))
        groups = {
            side: layer_groups(teacher_args[f"{side}_layers"], len(getattr(self, side).layers))
            for side in ("encoder", "decoder")
        }
        self._replace_token_embeddings()
        members: Dict[tuple, list] = {}  # kind -> [(position, module, tensor name, name, sources)]
        tied = None
        done = set()
        for name, _ in student:
            module_path, _, tensor_name = name.rpartition(".")
            module = self.get_submodule(module_path)
            if (id(module), tensor_name) in done:
                continue  # a shared module (encoder and decoder tables)
            done.add((id(module), tensor_name))
            if name == "decoder.output_projection.weight" and self.decoder.share_input_output_embed:
                tied = (module, tensor_name)
                continue
            sources = self._sources(name, module, groups)
            for source in sources:
                if source not in teacher_tensors:
                    raise WDSetupError(
                        f"--teacher-path: the student tensor {name} needs teacher tensor "
                        f"{source}, which the teacher does not have. Fix: keep the "
                        "teacher's architecture options; only shapes may differ"
                    )
            teacher_shape = tuple(teacher_tensors[sources[0]].shape)
            shape = tuple(getattr(module, tensor_name).shape)
            kind = self._generator_kind(name, module, teacher_shape, shape, len(sources), table_scale)
            members.setdefault(kind, []).append((len(done), module, tensor_name, name, sources))
        self._build_banks(teacher, members)
        if tied is not None:
            generate(*tied, SameAs(self.decoder.embed_tokens, "weight"))
            self.decoder.embed_tokens.parametrizations.weight[0].bank.full_table_in_pass = True

    def _build_banks(self, teacher: TransformerModel, members: Dict[tuple, list]) -> None:
        """One bank per kind of ``members`` (kind -> [(position, module, tensor name, name,
        sources)]), element-wise ones in runs of at most ``ELEMENTWISE_BANK_ELEMENTS``;
        every member then draws its start, in order of position."""
        self.generator_banks = nn.ModuleDict()
        order = []  # (position, bank, member)
        banks = []  # (generator class, its arguments, members)
        for (cls, args, _), bank_members in members.items():
            if cls is ElementwiseGenerator:
                banks += [(cls, args, run) for run in _runs_of_at_most(
                    bank_members, ELEMENTWISE_BANK_ELEMENTS, lambda m: getattr(m[1], m[2]).numel())]
            else:
                banks.append((cls, args, bank_members))
        elementwise = 0
        for cls, args, bank_members in banks:
            positions, modules, tensor_names, names, sources = zip(*bank_members)
            if cls is ElementwiseGenerator:
                generator = cls(*(tuple(getattr(m, t).shape) for m, t in zip(modules, tensor_names)))
                key, elementwise = f"elementwise_{elementwise}", elementwise + 1
            else:
                generator = (cls(*args, count=len(names), draw=False)
                             if cls in (MatrixGenerator, VectorGenerator) else cls(*args, draw=False))
                key = _bank_key(generator, names)
            bank = GeneratorBank(generator, teacher, sources, names)
            self.generator_banks[key] = bank
            for index, (position, module, tensor_name) in enumerate(zip(positions, modules, tensor_names)):
                generate(module, tensor_name, GeneratedTensor(bank, index))
                order.append((position, bank, index))
        for _, bank, index in sorted(order, key=lambda entry: entry[0]):
            bank.generator.reset_member(index)

    def _replace_token_embeddings(self) -> None:
        """Token tables become GeneratedEmbedding (row-wise generation in training)."""
        encoder_table = self.encoder.embed_tokens
        shared = encoder_table is self.decoder.embed_tokens
        self.encoder.embed_tokens = GeneratedEmbedding.replacing(encoder_table)
        self.decoder.embed_tokens = (
            self.encoder.embed_tokens if shared
            else GeneratedEmbedding.replacing(self.decoder.embed_tokens)
        )

    def _sources(self, name: str, module: nn.Module, groups) -> List[str]:
        """Teacher tensor names a student tensor is generated from."""
        if module is self.encoder.embed_tokens and module is self.decoder.embed_tokens:
            return ["decoder.embed_tokens.weight"]
        match = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", name)
        if match is None:
            return [name]
        side, index, rest = match.group(1), int(match.group(2)), match.group(3)
        return [f"{side}.layers.{j}.{rest}" for j in groups[side][index]]

    @staticmethod
    def _generator_kind(name, module, teacher_shape, shape, group_size, table_scale="token"):
        """(generator class, its arguments, tensor name or None): one bank per kind (a
        table or projection is a bank of its own)."""
        if name.endswith("output_projection.weight"):
            return ProjectionGenerator, (teacher_shape[1], shape[1]), name
        if isinstance(module, nn.Embedding):
            if teacher_shape[0] != shape[0]:
                raise WDSetupError(
                    f"{name}: the teacher table has {teacher_shape[0]} rows, the "
                    f"student's {shape[0]}. Fix: use the teacher's dictionaries"
                )
            return TableGenerator, (shape[0], teacher_shape[1], shape[1], table_scale == "token"), name
        if len(shape) != len(teacher_shape) or len(shape) not in (1, 2):
            raise WDSetupError(f"{name}: no WD generator for a tensor of shape {shape}")
        if shape == teacher_shape and group_size == 1:
            return ElementwiseGenerator, (), None  # any shapes: one flat buffer
        if len(shape) == 2:
            return MatrixGenerator, (teacher_shape, shape, group_size), None
        return VectorGenerator, (teacher_shape[0], shape[0], group_size), None

    def generated_tensors(self):
        """(module, tensor name, GeneratedTensor) for every generated student tensor."""
        for module in self.modules():
            for tensor_name, plist in getattr(module, "parametrizations", {}).items():
                if isinstance(plist[0], GeneratedTensor):
                    yield module, tensor_name, plist[0]

    def start_as_slice(self) -> None:
        """Optional init (``--wd-init slice``): the student starts as a slice of the teacher."""
        for bank in self.generator_banks.values():
            bank.generator.start_as_slice(bank.teacher_groups())

    @contextmanager
    def generation_pass(self):
        """Every bank generates at most once inside (reads reuse its tensors)."""
        with ExitStack() as stack:
            for bank in self.generator_banks.values():
                bank.open_pass()
                stack.callback(bank.close_pass)
            yield

    def forward(self, *args, **kwargs):
        with self.generation_pass():
            return super().forward(*args, **kwargs)

    def upgrade_state_dict_named(self, state_dict, name):
        """Phase-1 checkpoints of older wd_fairseq load as today's banks: those with one
        generator per tensor (``<tensor path>.parametrizations.<name>.0.generator.*``) and
        those with one element-wise bank (``generator_banks.elementwise.*``)."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = f"{name}." if name else ""
        one_bank = f"{prefix}generator_banks.{ONE_ELEMENTWISE_BANK}.generator."
        if f"{one_bank}scale" in state_dict:
            keys = [key for key in self.generator_banks if key.startswith("elementwise_")]
            for param_name in ("scale", "shift"):
                sizes = [getattr(self.generator_banks[key].generator, param_name).numel() for key in keys]
                parts = state_dict.pop(one_bank + param_name).split(sizes)
                for key, part in zip(keys, parts):
                    state_dict[f"{prefix}generator_banks.{key}.generator.{param_name}"] = part.clone()
        if not any(PER_TENSOR_GENERATOR.search(key) for key in state_dict):
            return
        for key, bank in self.generator_banks.items():
            for param_name, like in bank.generator.named_parameters():
                old = [f"{prefix}{_per_tensor_path(tensor)}.generator.{param_name}" for tensor in bank.names]
                state_dict[f"{prefix}generator_banks.{key}.generator.{param_name}"] = stack_members(
                    [state_dict.pop(k) for k in old], like)

    # -- inference ----------------------------------------------------------------

    def make_generation_fast_(self, **kwargs):
        """fairseq-generate, fairseq-interactive and the hub reach this through
        ``prepare_for_inference_``. fairseq's contract: the model is not trained
        afterwards. So the student is first materialised in place, and decodes at the
        materialised student's speed and memory."""
        if not self._is_generation_fast:
            self.materialize_in_place_()
        super().make_generation_fast_(**kwargs)

    @torch.no_grad()
    def materialize_in_place_(self) -> None:
        """Turn every generated tensor into a plain Parameter holding its current
        value (tied tensors stay one Parameter) and drop the teacher and generators."""
        training = self.training
        self.eval()  # cached values: a tied tensor returns its owner's tensor object
        values = {module: {name: getattr(module, name) for name in module.parametrizations}
                  for module in self.modules() if parametrize.is_parametrized(module)}
        plain = {}
        for module, tensors in values.items():
            # what parametrize.remove_parametrizations does, except deleting the
            # properties of the module's parametrized class: deep copies share it
            del module.parametrizations
            module.__class__ = type(module).__bases__[0]
            for name, value in tensors.items():
                # a Parameter that requires grad, like a loaded student's (same matmul paths)
                # (a copy: the value is a view of its bank's whole output)
                module.register_parameter(
                    name, plain.setdefault(id(value), nn.Parameter(value.detach().clone())))
        del self.teacher
        self.generator_banks = nn.ModuleDict()  # nothing left to generate
        self.train(training)

    # -- materialisation ----------------------------------------------------------

    @torch.no_grad()
    def student_state_dict(self) -> Dict[str, torch.Tensor]:
        """The generated student as a stock ``transformer`` state dict (model dtype)."""
        state = {}
        for key, value in self.state_dict().items():
            if key.startswith(("teacher.", "generator_banks.")):
                continue
            if ".parametrizations." not in key:
                state[key] = value
            elif key.endswith(".original"):
                module_path, tensor_name = key[: -len(".original")].split(".parametrizations.")
                tensor = getattr(self.get_submodule(module_path), tensor_name)
                state[f"{module_path}.{tensor_name}"] = tensor.detach().clone()
        return state


#: a generator parameter in a phase-1 checkpoint written before banks
def _per_tensor_path(tensor: str) -> str:
    """``a.b.weight`` -> ``a.b.parametrizations.weight.0``: where a per-tensor
    checkpoint kept that tensor's generator."""
    module_path, _, tensor_name = tensor.rpartition(".")
    return f"{module_path}.parametrizations.{tensor_name}.0"


def _runs_of_at_most(items: list, limit: int, size) -> List[list]:
    """``items`` cut, in order, into runs whose ``size`` adds up to at most ``limit`` (an
    item bigger than ``limit`` is a run of its own)."""
    runs, total = [], 0
    for item in items:
        if not runs or total + size(item) > limit:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size(item)
    return runs


def _bank_key(generator: ParameterGenerator, names) -> str:
    """The name in ``generator_banks`` (and in checkpoints) of a bank other than the
    element-wise ones (``elementwise_<i>``)."""
    if isinstance(generator, (TableGenerator, ProjectionGenerator)):
        return names[0].replace(".", "_")  # a bank of one
    shapes = "_".join("x".join(map(str, p.shape[1:])) for p in generator.parameters())
    return f"{type(generator).__name__}_{shapes}"


def _preset(args, **defaults):
    for name, value in defaults.items():
        if safe_getattr(args, name, None) is None:
            setattr(args, name, value)


@register_model_architecture("wd_transformer", "wd_transformer_stu1")
def wd_transformer_stu1(args):
    """The authors' stu1: teacher encoder, decoder 1 layer x 256 / 1024 / 8 heads."""
    _preset(args, decoder_layers=1, decoder_embed_dim=256, decoder_ffn_embed_dim=1024,
            decoder_attention_heads=8)


@register_model_architecture("wd_transformer", "wd_transformer_stu2")
def wd_transformer_stu2(args):
    """The authors' stu2: teacher encoder, decoder 2 layers x 512 / 2048 / 8 heads."""
    _preset(args, decoder_layers=2, decoder_embed_dim=512, decoder_ffn_embed_dim=2048,
            decoder_attention_heads=8)
