"""Parameter generators: trainable maps from frozen teacher tensors to student tensors.

Each generator implements one recipe of docs/method.md section 3 for a *bank* of
``n`` student tensors of one shape (its parameters carry a leading member
dimension ``n``), so a bank costs a few batched kernels, not a few per tensor.
``reset_member(k)`` draws member k's random start, the same values as a generator
of that tensor alone would get; ``draw=False`` leaves every member to the caller
(who draws them in the order of its tensors).

- ``teacher_input(groups)``: the teacher tensors of each member's layer group
  (``groups[k]``: g tensors) as the generator's fp32 input. The teacher is frozen,
  so the caller computes it once and reuses it; teacher tensors that already lie end
  to end in one storage (:mod:`~wd_fairseq.teacher_layout`) are read as a view, not copied.
- ``forward(x)``: every member's student tensor, computed in fp32 (autocast off)
  whatever the dtype of the inputs and of the generator's own parameters.
- ``members(out)``: ``out`` split into one tensor per member.

``start_as_slice(groups)`` is an optional initialisation (not the authors'):
projections start as selections of the first teacher rows/columns, layers of a
group are averaged, and the shift is set so that at step 0 each generated tensor
equals that slice of the teacher exactly.
"""

from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from .teacher_layout import joined

Groups = Sequence[Sequence[Tensor]]


@contextmanager
def fp32_compute(device: torch.device):
    """Run the enclosed maths in fp32, even inside an ``--amp`` autocast region."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _selection(rows: int, cols: int) -> Tensor:
    """(rows, cols) matrix that keeps the first min(rows, cols) coordinates."""
    return torch.eye(rows, cols)


def _empty(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def _stacked_layers(groups: Groups) -> Tensor:
    """(n, g, *shape) fp32: every member's g teacher layers."""
    flat = [t for group in groups for t in group]
    return joined(flat).float().view(len(groups), len(groups[0]), *flat[0].shape)


class _ScaleShift(torch.autograd.Function):
    """A ⊙ X + B (equal shapes) in one pass; its backward computes only the products it
    needs (torch's ``addcmul`` backward also multiplies by its scalar ``value``: one more
    pass over every element of a bank)."""

    @staticmethod
    def forward(ctx, scale: Tensor, x: Tensor, shift: Tensor) -> Tensor:
        ctx.save_for_backward(scale, x)
        return torch.addcmul(shift, scale, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scale, x = ctx.saved_tensors
        need_scale, need_x, need_shift = ctx.needs_input_grad
        return (grad * x if need_scale else None, grad * scale if need_x else None,
                grad if need_shift else None)


def _scale_shift(scale: Tensor, x: Tensor, shift: Tensor) -> Tensor:
    """fp32 A ⊙ X + B of the generator's own A and B (any dtype) and its input X."""
    return _ScaleShift.apply(scale.float(), x, shift.float())


def _layer_weights(mix: Tensor, reduce: Tensor) -> Tensor:
    """(n, 1, g): c = M·v per member, as a row for ``bmm``."""
    return torch.bmm(mix.float(), reduce.float()).transpose(1, 2)


def _mix_layers(x: Tensor, mix: Tensor, reduce: Tensor) -> Tensor:
    """(n, *shape): Σ_l c_l · x[:, l] for x (n, g, *shape)."""
    n, g = x.shape[:2]
    return torch.bmm(_layer_weights(mix, reduce), x.reshape(n, g, -1)).view(n, *x.shape[2:])


class ParameterGenerator(nn.Module):
    """Base class of the generators of one recipe (see the module docstring)."""

    def teacher_input(self, groups: Groups) -> Tensor:
        return _stacked_layers(groups)

    def members(self, out: Tensor) -> List[Tensor]:
        return list(out.unbind(0))

    def reset_member(self, k: int) -> None:
        raise NotImplementedError

    def start_as_slice(self, groups: Groups) -> None:
        raise NotImplementedError

    def _reset_all(self, count: int, draw: bool) -> None:
        if draw:
            for k in range(count):
                self.reset_member(k)


def stack_members(values: Sequence[Tensor], like: Tensor) -> Tensor:
    """Per-member tensors (e.g. of a per-tensor checkpoint) as one bank parameter shaped ``like``."""
    return torch.cat([v.reshape(-1, *like.shape[1:]) for v in values]).to(like.dtype)


class MatrixGenerator(ParameterGenerator):
    """docs/method.md 3.2, per member: W_s = A ⊙ tanh(P_outᵀ · (Σ_l c_l W_l) · P_in) + B, c = M·v.

    teacher: n groups of g tensors (O_T, I_T) -> n student tensors (O_S, I_S).
    Parameters: out_proj P_out (n, O_T, O_S), in_proj P_in (n, I_T, I_S),
    layer_mix M (n, g, g), layer_reduce v (n, g, 1), scale A and shift B (n, O_S, I_S).
    """

    def __init__(self, teacher_shape, student_shape, group_size: int, count: int = 1,
                 draw: bool = True):
        super().__init__()
        (o_t, i_t), (o_s, i_s), g, n = teacher_shape, student_shape, group_size, count
        self.out_proj = _empty(n, o_t, o_s)
        self.in_proj = _empty(n, i_t, i_s)
        self.layer_mix = _empty(n, g, g)
        self.layer_reduce = nn.Parameter(torch.full((n, g, 1), 1.0 / g))
        self.scale = nn.Parameter(torch.ones(n, o_s, i_s))
        self.shift = nn.Parameter(torch.zeros(n, o_s, i_s))
        # Cheaper association of P_outᵀ·W̄·P_in, in multiply-adds.
        project_out_first = o_s * o_t * i_t + o_s * i_t * i_s
        project_in_first = o_t * i_t * i_s + o_s * o_t * i_s
        self.project_out_first = project_out_first <= project_in_first
        self._reset_all(n, draw)

    @torch.no_grad()
    def reset_member(self, k: int) -> None:
        """3.2's start: xavier-normal projections and mix, c = 1/g, A = 1, B = 0."""
        for p in (self.out_proj, self.in_proj, self.layer_mix):
            nn.init.xavier_normal_(p[k])

    def project(self, x: Tensor) -> Tensor:
        """P_outᵀ · W̄ · P_in, (n, O_S, I_S), before the tanh; x (n, g, O_T, I_T)."""
        w = _mix_layers(x, self.layer_mix, self.layer_reduce)
        p_out_t, p_in = self.out_proj.float().transpose(1, 2), self.in_proj.float()
        if self.project_out_first:
            return torch.bmm(torch.bmm(p_out_t, w), p_in)
        return torch.bmm(p_out_t, torch.bmm(w, p_in))

    def forward(self, x: Tensor) -> Tensor:
        with fp32_compute(x.device):
            return _scale_shift(self.scale, torch.tanh(self.project(x)), self.shift)

    @torch.no_grad()
    def start_as_slice(self, groups: Groups) -> None:
        self.out_proj.copy_(_selection(*self.out_proj.shape[1:]))
        self.in_proj.copy_(_selection(*self.in_proj.shape[1:]))
        g = self.layer_mix.shape[1]
        self.layer_mix.copy_(torch.eye(g))
        self.layer_reduce.fill_(1.0 / g)
        w = self.project(self.teacher_input(groups))
        self.scale.fill_(1.0)
        self.shift.copy_(w - torch.tanh(w))


class VectorGenerator(ParameterGenerator):
    """docs/method.md 3.3/3.4 (biases, LayerNorm gains and shifts), per member:
    b_s = a ⊙ tanh(Q_outᵀ · (Σ_l c_l b_l)) + β, c = N·u.

    teacher: n groups of g tensors (O_T,) -> n student tensors (O_S,).
    Parameters: out_proj Q_out (n, O_T, O_S), layer_mix N (n, g, g),
    layer_reduce u (n, g, 1), scale a and shift β (n, O_S).
    """

    def __init__(self, teacher_size: int, student_size: int, group_size: int, count: int = 1,
                 draw: bool = True):
        super().__init__()
        g, n = group_size, count
        self.out_proj = _empty(n, teacher_size, student_size)
        self.layer_mix = _empty(n, g, g)
        self.layer_reduce = nn.Parameter(torch.full((n, g, 1), 1.0 / g))
        self.scale = nn.Parameter(torch.ones(n, student_size))
        self.shift = nn.Parameter(torch.zeros(n, student_size))
        self._reset_all(n, draw)

    @torch.no_grad()
    def reset_member(self, k: int) -> None:
        for p in (self.out_proj, self.layer_mix):
            nn.init.xavier_normal_(p[k])

    def project(self, x: Tensor) -> Tensor:
        """(n, O_S) before the tanh; x (n, g, O_T)."""
        mixed = torch.bmm(_layer_weights(self.layer_mix, self.layer_reduce), x)  # (n, 1, O_T)
        return torch.bmm(mixed, self.out_proj.float()).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        with fp32_compute(x.device):
            return _scale_shift(self.scale, torch.tanh(self.project(x)), self.shift)

    @torch.no_grad()
    def start_as_slice(self, groups: Groups) -> None:
        self.out_proj.copy_(_selection(*self.out_proj.shape[1:]))
        g = self.layer_mix.shape[1]
        self.layer_mix.copy_(torch.eye(g))
        self.layer_reduce.fill_(1.0 / g)
        b = self.project(self.teacher_input(groups))
        self.scale.fill_(1.0)
        self.shift.copy_(b - torch.tanh(b))


class ElementwiseGenerator(ParameterGenerator):
    """docs/method.md 3.6 (same shape, same layer), per member: X_s = A ⊙ tanh(X_t) + B.

    teacher: n tensors of any shapes (one per group) -> n student tensors of the
    same shapes. The members lie end to end in one flat buffer of N elements:
    scale A and shift B (N,); the input is the constant tanh(X_t), (N,).
    """

    def __init__(self, *shapes):
        super().__init__()
        self.shapes = [torch.Size(shape) for shape in shapes]
        size = sum(shape.numel() for shape in self.shapes)
        self.scale = nn.Parameter(torch.ones(size))
        self.shift = nn.Parameter(torch.zeros(size))

    def reset_member(self, k: int) -> None:
        pass  # A = 1, B = 0: nothing random

    def teacher_input(self, groups: Groups) -> Tensor:
        return torch.tanh(self._flat(groups))

    @staticmethod
    def _flat(groups: Groups) -> Tensor:
        return joined([group[0] for group in groups]).float()

    def members(self, out: Tensor) -> List[Tensor]:
        parts = out.split([shape.numel() for shape in self.shapes])
        return [part.view(shape) for part, shape in zip(parts, self.shapes)]

    def forward(self, x: Tensor) -> Tensor:
        with fp32_compute(x.device):
            return _scale_shift(self.scale, x, self.shift)

    @torch.no_grad()
    def start_as_slice(self, groups: Groups) -> None:
        t = self._flat(groups)
        self.scale.fill_(1.0)
        self.shift.copy_(t - torch.tanh(t))


class TableGenerator(ParameterGenerator):
    """docs/method.md 3.7, an embedding table (a bank of one):
    X[y] = A[y] ⊙ tanh(E[y] · P) + B[y].

    teacher: table E (V, d_T) -> student table (V, d_S). P (d_T, d_S) exists only
    when the widths differ (same width: the element-wise recipe, per token).
    ``rows(table, index)`` generates only the rows in ``index``.
    ``per_token=False`` (``--wd-table-scale shared``, not the authors'): one A and B
    (1, d_S) for every token, so the generator's size does not grow with V.
    """

    def __init__(self, num_rows: int, teacher_dim: int, student_dim: int, per_token: bool = True,
                 draw: bool = True):
        super().__init__()
        self.proj: Optional[nn.Parameter] = None
        if teacher_dim != student_dim:
            self.proj = _empty(teacher_dim, student_dim)
        rows = num_rows if per_token else 1
        self.scale = nn.Parameter(torch.ones(rows, student_dim))
        self.shift = nn.Parameter(torch.zeros(rows, student_dim))
        self._reset_all(1, draw)

    @torch.no_grad()
    def reset_member(self, k: int = 0) -> None:
        if self.proj is not None:
            nn.init.xavier_normal_(self.proj)

    def teacher_input(self, groups: Groups) -> Tensor:
        return groups[0][0]  # rows are cast when read: no fp32 copy of the table

    def members(self, out: Tensor) -> List[Tensor]:
        return [out]

    def _project(self, table: Tensor) -> Tensor:
        table = table.float()
        return table if self.proj is None else table @ self.proj.float()

    def rows(self, table: Tensor, index: Optional[Tensor] = None) -> Tensor:
        """Student rows ``index`` (all rows if None): (len(index), d_S)."""
        with fp32_compute(table.device):
            scale, shift = self.scale, self.shift
            if index is not None:
                table = table[index]
                if scale.shape[0] > 1:  # (per token)
                    scale, shift = scale[index], shift[index]
            return scale.float() * torch.tanh(self._project(table)) + shift.float()

    def forward(self, table: Tensor) -> Tensor:
        return self.rows(table)

    @torch.no_grad()
    def start_as_slice(self, groups: Groups) -> None:
        if self.proj is not None:
            self.proj.copy_(_selection(*self.proj.shape))
        x = self._project(self.teacher_input(groups))
        self.scale.fill_(1.0)
        # exact per token; with one shared B the mean over tokens (the closest start)
        residual = x - torch.tanh(x)
        self.shift.copy_(residual if self.shift.shape[0] > 1 else residual.mean(0, keepdim=True))


class ProjectionGenerator(ParameterGenerator):
    """docs/method.md 3.7, output projection (a bank of one): W_out = O_T · P_o, no tanh, no A/B.

    teacher: O_T (V, d_T) -> student (V, d_S). When d_S = d_T there is no P_o and
    the teacher's projection is used as is (the authors' choice: nothing trains).
    """

    def __init__(self, teacher_dim: int, student_dim: int, draw: bool = True):
        super().__init__()
        self.proj: Optional[nn.Parameter] = None
        if teacher_dim != student_dim:
            self.proj = _empty(teacher_dim, student_dim)
        self._reset_all(1, draw)

    @torch.no_grad()
    def reset_member(self, k: int = 0) -> None:
        if self.proj is not None:
            nn.init.xavier_normal_(self.proj)

    def teacher_input(self, groups: Groups) -> Tensor:
        return groups[0][0]

    def members(self, out: Tensor) -> List[Tensor]:
        return [out]

    def forward(self, table: Tensor) -> Tensor:
        with fp32_compute(table.device):
            if self.proj is None:
                return table.float()
            return table.float() @ self.proj.float()

    @torch.no_grad()
    def start_as_slice(self, groups: Groups) -> None:
        if self.proj is not None:
            self.proj.copy_(_selection(*self.proj.shape))
