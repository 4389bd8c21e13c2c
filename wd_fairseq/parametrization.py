"""Student tensors as ``torch.nn.utils.parametrize`` parametrizations.

The WD student is a stock fairseq Transformer whose every weight is replaced by a
:class:`GeneratedTensor`: reading ``module.weight`` returns that tensor's share of
what its :class:`GeneratorBank` (one generator over every student tensor of one
kind and shape) computes from the frozen teacher tensors, so every fairseq code
path (training, incremental decoding, ensembles) sees ordinary tensors. The
student's own storage for the tensor shrinks to an empty placeholder that only
carries the model's dtype.
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from .generator import ParameterGenerator, ProjectionGenerator, TableGenerator, fp32_compute
from .teacher_layout import lay_out_end_to_end

#: Optimizer steps taken in this process. Optimizers write parameters through ``p.data``
#: (fairseq's Adam, its fp16 optimizers), which bumps no version counter, so an
#: eval-mode cached value is also dropped after any step.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class GeneratorBank(nn.Module):
    """The student tensors one generator makes together, and when it makes them.

    Args:
        generator: the trainable map of every member (fp32 maths).
        teacher: the module holding the frozen teacher tensors. It is not
            registered here (the teacher lives once, in the WD model).
        sources: per member, the names of its layer group's teacher tensors in
            ``teacher`` (in layer order).
        names: per member, the student tensor's name (messages, old checkpoints).

    ``values(dtype)`` returns every member's tensor. Within a generation pass
    (``open_pass``/``close_pass``: one model forward) the first call generates and
    later ones reuse the result. In eval mode with grad disabled the result is cached
    until the mode changes, the module moves (``_apply``), a state dict is loaded
    into it (``assign=True`` too), an optimizer takes a step, or an input tensor
    changes in place (version counter).
    """

    def __init__(self, generator: ParameterGenerator, teacher: nn.Module,
                 sources: Sequence[Sequence[str]], names: Sequence[str]):
        super().__init__()
        self.generator = generator
        self.sources = [list(s) for s in sources]
        self.names = list(names)
        self._teacher = [teacher]
        #: a table that a tied projection reads whole: within a pass its rows come
        #: from the whole table, generated once
        self.full_table_in_pass = False
        self._pass: Optional[dict] = None  # dtype -> members, while a pass is open
        self._input: Optional[_TeacherInput] = None
        self._eval: Optional[_EvalCache] = None
        self.register_load_state_dict_post_hook(GeneratorBank._after_load)
        self.lay_out_teacher()

    def lay_out_teacher(self) -> None:
        """Put the members' teacher tensors end to end in one buffer (they become views of
        it), so that the generator reads them stacked without a copy. Tables and
        projections read their one tensor as it is."""
        if not isinstance(self.generator, (TableGenerator, ProjectionGenerator)):
            lay_out_end_to_end([t for group in self.teacher_groups() for t in group])

    def teacher_tensors(self, member: int) -> List[Tensor]:
        return [self._teacher[0].get_parameter(name) for name in self.sources[member]]

    def teacher_groups(self) -> List[List[Tensor]]:
        return [self.teacher_tensors(k) for k in range(len(self.sources))]

    def teacher_input(self) -> Tensor:
        """The generator's fp32 input (the stacked teacher layers, or their tanh), computed
        once and kept while the teacher tensors are unchanged: for an fp32 teacher laid out
        by :meth:`lay_out_teacher` a view of it; else (an fp16/bf16 teacher, a tanh) a
        copy the size of the members' teacher tensors in fp32."""
        groups = self.teacher_groups()
        if self._input is None or not self._input.valid(groups):
            with torch.no_grad(), fp32_compute(groups[0][0].device):
                self._input = _TeacherInput(self.generator.teacher_input(groups), groups)
        return self._input.value

    def open_pass(self) -> None:
        self._pass = {}

    def close_pass(self) -> None:
        self._pass = None

    def values(self, dtype: torch.dtype) -> List[Tensor]:
        """Every member's student tensor, in ``dtype``."""
        if self.training or torch.is_grad_enabled():
            self._eval = None
            if self._pass is not None and dtype in self._pass:
                return self._pass[dtype]
            members = self._generate(dtype)
            if self._pass is not None:
                self._pass[dtype] = members
            return members
        if self._eval is None or self._eval.dtype != dtype or not self._eval.valid(range(len(self.names))):
            # requires_grad (harmless: only returned under no_grad) keeps torch's matmul
            # folding (B*beam, 1, C) activations into one GEMM instead of a batched one;
            # detach first: a generator may return a teacher tensor itself.
            members = [m.detach().requires_grad_() for m in self._generate(dtype)]
            self._eval = _EvalCache(members, dtype, list(self.generator.parameters()), self.teacher_groups())
        return self._eval.members

    def cached(self, member: int) -> Optional[Tensor]:
        """Member ``member``'s eval-mode value if it is cached and still valid, else None."""
        if self._eval is None or self.training or torch.is_grad_enabled():
            return None
        return self._eval.members[member] if self._eval.valid((member,)) else None

    def rows(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """Only the rows ``index`` of a generated table (TableGenerator only)."""
        assert isinstance(self.generator, TableGenerator)
        if self.full_table_in_pass and self._pass is not None:
            return self.values(dtype)[0][index]
        return self.generator.rows(self.teacher_input(), index).to(dtype)

    def _generate(self, dtype: torch.dtype) -> List[Tensor]:
        return self.generator.members(self.generator(self.teacher_input()).to(dtype))

    def _drop_caches(self) -> None:
        self._pass = self._input = self._eval = None

    @staticmethod
    def _after_load(module: "GeneratorBank", incompatible_keys=None) -> None:
        # load_state_dict may have replaced the teacher tensors (assign=True)
        module._drop_caches()
        module.lay_out_teacher()

    def train(self, mode: bool = True):
        self._eval = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to()/.half(): the teacher (a module before the banks) was converted tensor by tensor
        self._drop_caches()
        result = super()._apply(fn, recurse)
        self.lay_out_teacher()
        return result


class _TeacherInput:
    """A generator input and the teacher tensors it was made from: their identity, storage
    (``.data`` replaced) and version counters (changed in place)."""

    def __init__(self, value: Tensor, teacher: List[List[Tensor]]):
        self.value, self.teacher = value, teacher
        self.versions = _versions(teacher)

    def valid(self, teacher: List[List[Tensor]]) -> bool:
        return (all(a is b for group, same in zip(teacher, self.teacher) for a, b in zip(group, same))
                and _versions(teacher) == self.versions)


def _versions(teacher: List[List[Tensor]]) -> List[List[tuple]]:
    return [[(t._version, t.data_ptr(), t.dtype) for t in group] for group in teacher]


class _EvalCache:
    """Eval-mode member values and what they depend on: the optimizer step count and the
    version counters of the generator's parameters and of each member's teacher tensors."""

    def __init__(self, members: List[Tensor], dtype: torch.dtype, params: List[Tensor],
                 teacher: List[List[Tensor]]):
        self.members, self.dtype, self.params, self.teacher = members, dtype, params, teacher
        self.steps = _optimizer_steps[0]
        self.versions = [p._version for p in params]
        self.teacher_versions = [[t._version for t in group] for group in teacher]

    def valid(self, members) -> bool:
        if self.steps != _optimizer_steps[0] or [p._version for p in self.params] != self.versions:
            return False
        return all([t._version for t in self.teacher[k]] == self.teacher_versions[k] for k in members)


class GeneratedTensor(nn.Module):
    """Parametrization returning member ``index`` of ``bank`` (not registered here:
    the bank lives once, in the WD model)."""

    def __init__(self, bank: GeneratorBank, index: int):
        super().__init__()
        self._bank = [bank]
        self.index = index

    @property
    def bank(self) -> GeneratorBank:
        return self._bank[0]

    @property
    def sources(self) -> List[str]:
        return self.bank.sources[self.index]

    def teacher_tensors(self) -> List[Tensor]:
        return self.bank.teacher_tensors(self.index)

    def forward(self, placeholder: Tensor) -> Tensor:
        return self.bank.values(placeholder.dtype)[self.index]

    def cached(self) -> Optional[Tensor]:
        """The eval-mode value if it is cached and still valid, else None."""
        return self.bank.cached(self.index)

    def rows(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """Only the rows ``index`` of a generated table."""
        return self.bank.rows(index, dtype)

    def right_inverse(self, value: Tensor) -> Tensor:
        # Called once at registration: the student's own tensor is not kept.
        return value.new_empty(0)


class SameAs(nn.Module):
    """Parametrization for a tied student tensor (decoder output projection =
    decoder embedding): returns what another parametrized tensor generates."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self._owner = [owner]
        self.name = name

    def forward(self, placeholder: Tensor) -> Tensor:
        return getattr(self._owner[0], self.name)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value.new_empty(0)


class GeneratedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose table is generated; in training it generates
    only the rows of the tokens in the batch."""

    @classmethod
    def replacing(cls, embedding: nn.Embedding) -> "GeneratedEmbedding":
        return cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            device=embedding.weight.device,
            dtype=embedding.weight.dtype,
        )

    def forward(self, tokens: Tensor) -> Tensor:
        generated: Optional[GeneratedTensor] = None
        if parametrize.is_parametrized(self, "weight"):
            generated = self.parametrizations.weight[0]
        if generated is None or not (self.training and torch.is_grad_enabled()):
            return super().forward(tokens)
        dtype = self.parametrizations.weight.original.dtype
        used, position = torch.unique(tokens, return_inverse=True)
        return F.embedding(position, generated.rows(used, dtype))


def generate(module: nn.Module, name: str, generator: nn.Module) -> None:
    """Replace ``module.<name>`` by what ``generator`` (a parametrization) computes."""
    parametrize.register_parametrization(module, name, generator, unsafe=True)
    module.parametrizations[name].original.requires_grad_(False)
    if isinstance(generator, GeneratedTensor):
        _read_cache_first(module, name)


def _read_cache_first(module: nn.Module, name: str) -> None:
    """Reads of ``module.<name>`` return a valid eval-mode cached value directly.

    torch's parametrization call costs several microseconds a read, and incremental
    decoding reads every weight at every step. ``register_parametrization`` gave the
    module a class of its own with a property for ``name``; this wraps that property.
    """
    torch_property = getattr(type(module), name)

    def read(self) -> Tensor:
        # self.parametrizations[name][0], without nn.Module's attribute fallbacks
        value = self._modules["parametrizations"]._modules[name]._modules["0"].cached()
        return torch_property.fget(self) if value is None else value

    setattr(type(module), name, property(read, torch_property.fset))
