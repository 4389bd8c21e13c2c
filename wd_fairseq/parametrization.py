"""Student tensors as ``torch.nn.utils.parametrize`` parametrizations.

The WD student is a stock fairseq Transformer whose every weight is replaced by a
:class:`GeneratedTensor`: reading ``module.weight`` runs the generator on the
frozen teacher tensors, so every fairseq code path (training, incremental
decoding, ensembles) sees ordinary tensors. The student's own storage for the
tensor shrinks to an empty placeholder that only carries the model's dtype.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from .generator import ParameterGenerator, TableGenerator

#: Optimizer steps taken in this process. Optimizers write parameters through ``p.data``
#: (fairseq's Adam, its fp16 optimizers), which bumps no version counter, so an
#: eval-mode cached value is also dropped after any step.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class GeneratedTensor(nn.Module):
    """Parametrization computing a student tensor from teacher tensors.

    Args:
        generator: the trainable map (fp32 maths).
        teacher: the module holding the frozen teacher tensors. It is not
            registered here (the teacher lives once, in the WD model).
        sources: names of the teacher tensors in ``teacher`` (one per layer of the
            group, in order).

    In eval mode with grad disabled the result is cached and reused until the
    mode changes, the module moves (``_apply``), a state dict is loaded into it
    (``assign=True`` too), an optimizer takes a step, or any input tensor changes
    in place (version counter).
    """

    def __init__(self, generator: ParameterGenerator, teacher: nn.Module, sources: List[str]):
        super().__init__()
        self.generator = generator
        self.sources = list(sources)
        self._teacher = [teacher]
        self._cache = None
        self.register_load_state_dict_post_hook(GeneratedTensor._drop_cache)

    def teacher_tensors(self) -> List[Tensor]:
        return [self._teacher[0].get_parameter(name) for name in self.sources]

    def forward(self, placeholder: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.generator(*self.teacher_tensors()).to(placeholder.dtype)
        value = self.cached()
        if value is None:
            teacher = self.teacher_tensors()
            inputs = teacher + list(self.generator.parameters())
            # requires_grad (harmless: only returned under no_grad) keeps torch's matmul
            # folding (B*beam, 1, C) activations into one GEMM instead of a batched one;
            # detach first: a generator may return a teacher tensor itself.
            value = self.generator(*teacher).to(placeholder.dtype).detach().requires_grad_()
            self._cache = (inputs, _versions(inputs), _optimizer_steps[0], value)
        return value

    def cached(self) -> Optional[Tensor]:
        """The eval-mode value if it is cached and still valid, else None."""
        if self._cache is None or self.training or torch.is_grad_enabled():
            return None
        inputs, versions, steps, value = self._cache
        if steps != _optimizer_steps[0] or _versions(inputs) != versions:
            return None
        return value

    @staticmethod
    def _drop_cache(module: "GeneratedTensor", incompatible_keys) -> None:
        module._cache = None  # load_state_dict may have replaced the inputs (assign=True)

    def rows(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """Only the rows ``index`` of a generated table (TableGenerator only)."""
        assert isinstance(self.generator, TableGenerator)
        return self.generator.rows(self.teacher_tensors()[0], index).to(dtype)

    def right_inverse(self, value: Tensor) -> Tensor:
        # Called once at registration: the student's own tensor is not kept.
        return value.new_empty(0)

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._cache = None  # .to()/.half(): inputs and dtype are about to change
        return super()._apply(fn, recurse)


def _versions(tensors: List[Tensor]) -> list:
    """What a cached result depends on: the in-place version of each input
    (``.to()``/``.half()`` replace storage through ``_apply``, which clears the cache)."""
    return [t._version for t in tensors]


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
