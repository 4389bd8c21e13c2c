"""Parameter generators: trainable maps from frozen teacher tensors to one student tensor.

Each generator implements one recipe of docs/method.md section 3. ``forward(*teacher)``
takes the teacher tensors of the student tensor's layer group and returns the
student tensor, always computed in fp32 (autocast off) whatever the dtype of the
inputs and of the generator's own parameters; the caller casts the result.

``start_as_slice(*teacher)`` is an optional initialisation (not the authors'):
projections start as selections of the first teacher rows/columns, layers of a
group are averaged, and the shift is set so that at step 0 the generated tensor
equals that slice of the teacher exactly.
"""

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


@contextmanager
def fp32_compute(device: torch.device):
    """Run the enclosed maths in fp32, even inside an ``--amp`` autocast region."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _selection(rows: int, cols: int) -> Tensor:
    """(rows, cols) matrix that keeps the first min(rows, cols) coordinates."""
    return torch.eye(rows, cols)


def _mix_layers(layers: Sequence[Tensor], mix: Tensor, reduce: Tensor) -> Tensor:
    """Σ_l c_l · layers[l] with c = mix · reduce; layers are g tensors of equal shape."""
    c = (mix.float() @ reduce.float()).squeeze(1)  # (g,)
    if len(layers) == 1:
        return layers[0].float() * c[0]
    return torch.tensordot(torch.stack([t.float() for t in layers]), c, dims=([0], [0]))


class ParameterGenerator(nn.Module):
    """Base class: ``forward(*teacher) -> student tensor`` (fp32)."""

    def start_as_slice(self, *teacher: Tensor) -> None:
        raise NotImplementedError


class MatrixGenerator(ParameterGenerator):
    """docs/method.md 3.2: W_s = A ⊙ tanh(P_outᵀ · (Σ_l c_l W_l) · P_in) + B, c = M·v.

    teacher: g tensors (O_T, I_T) -> student (O_S, I_S).
    Parameters: out_proj P_out (O_T, O_S), in_proj P_in (I_T, I_S),
    layer_mix M (g, g), layer_reduce v (g, 1), scale A and shift B (O_S, I_S).
    """

    def __init__(self, teacher_shape, student_shape, group_size: int):
        super().__init__()
        (o_t, i_t), (o_s, i_s), g = teacher_shape, student_shape, group_size
        self.out_proj = nn.Parameter(nn.init.xavier_normal_(torch.empty(o_t, o_s)))
        self.in_proj = nn.Parameter(nn.init.xavier_normal_(torch.empty(i_t, i_s)))
        self.layer_mix = nn.Parameter(nn.init.xavier_normal_(torch.empty(g, g)))
        self.layer_reduce = nn.Parameter(torch.full((g, 1), 1.0 / g))
        self.scale = nn.Parameter(torch.ones(o_s, i_s))
        self.shift = nn.Parameter(torch.zeros(o_s, i_s))
        # Cheaper association of P_outᵀ·W̄·P_in, in multiply-adds.
        project_out_first = o_s * o_t * i_t + o_s * i_t * i_s
        project_in_first = o_t * i_t * i_s + o_s * o_t * i_s
        self.project_out_first = project_out_first <= project_in_first

    def project(self, *teacher: Tensor) -> Tensor:
        """P_outᵀ · W̄ · P_in, (O_S, I_S), before the tanh."""
        w = _mix_layers(teacher, self.layer_mix, self.layer_reduce)
        p_out, p_in = self.out_proj.float(), self.in_proj.float()
        if self.project_out_first:
            return (p_out.t() @ w) @ p_in
        return p_out.t() @ (w @ p_in)

    def forward(self, *teacher: Tensor) -> Tensor:
        with fp32_compute(teacher[0].device):
            return self.scale.float() * torch.tanh(self.project(*teacher)) + self.shift.float()

    @torch.no_grad()
    def start_as_slice(self, *teacher: Tensor) -> None:
        self.out_proj.copy_(_selection(*self.out_proj.shape))
        self.in_proj.copy_(_selection(*self.in_proj.shape))
        self.layer_mix.copy_(torch.eye(len(teacher)))
        self.layer_reduce.fill_(1.0 / len(teacher))
        w = self.project(*teacher)
        self.scale.fill_(1.0)
        self.shift.copy_(w - torch.tanh(w))


class VectorGenerator(ParameterGenerator):
    """docs/method.md 3.3/3.4 (biases, LayerNorm gains and shifts):
    b_s = a ⊙ tanh(Q_outᵀ · (Σ_l c_l b_l)) + β, c = N·u.

    teacher: g tensors (O_T,) -> student (O_S,).
    Parameters: out_proj Q_out (O_T, O_S), layer_mix N (g, g), layer_reduce u (g, 1),
    scale a and shift β (O_S,).
    """

    def __init__(self, teacher_size: int, student_size: int, group_size: int):
        super().__init__()
        g = group_size
        self.out_proj = nn.Parameter(
            nn.init.xavier_normal_(torch.empty(teacher_size, student_size))
        )
        self.layer_mix = nn.Parameter(nn.init.xavier_normal_(torch.empty(g, g)))
        self.layer_reduce = nn.Parameter(torch.full((g, 1), 1.0 / g))
        self.scale = nn.Parameter(torch.ones(student_size))
        self.shift = nn.Parameter(torch.zeros(student_size))

    def project(self, *teacher: Tensor) -> Tensor:
        return _mix_layers(teacher, self.layer_mix, self.layer_reduce) @ self.out_proj.float()

    def forward(self, *teacher: Tensor) -> Tensor:
        with fp32_compute(teacher[0].device):
            return self.scale.float() * torch.tanh(self.project(*teacher)) + self.shift.float()

    @torch.no_grad()
    def start_as_slice(self, *teacher: Tensor) -> None:
        self.out_proj.copy_(_selection(*self.out_proj.shape))
        self.layer_mix.copy_(torch.eye(len(teacher)))
        self.layer_reduce.fill_(1.0 / len(teacher))
        b = self.project(*teacher)
        self.scale.fill_(1.0)
        self.shift.copy_(b - torch.tanh(b))


class ElementwiseGenerator(ParameterGenerator):
    """docs/method.md 3.6 (same shape, same layer): X_s = A ⊙ tanh(X_t) + B.

    teacher: one tensor of any shape -> student of the same shape.
    """

    def __init__(self, shape):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape))
        self.shift = nn.Parameter(torch.zeros(shape))

    def forward(self, teacher: Tensor) -> Tensor:
        with fp32_compute(teacher.device):
            return self.scale.float() * torch.tanh(teacher.float()) + self.shift.float()

    @torch.no_grad()
    def start_as_slice(self, teacher: Tensor) -> None:
        t = teacher.float()
        self.scale.fill_(1.0)
        self.shift.copy_(t - torch.tanh(t))


class TableGenerator(ParameterGenerator):
    """docs/method.md 3.7, embedding tables: X[y] = A[y] ⊙ tanh(E[y] · P) + B[y].

    teacher: table E (V, d_T) -> student table (V, d_S). P (d_T, d_S) exists only
    when the widths differ (same width: the element-wise recipe, per token).
    ``rows(table, index)`` generates only the rows in ``index``.
    ``per_token=False`` (``--wd-table-scale shared``, not the authors'): one A and B
    (1, d_S) for every token, so the generator's size does not grow with V.
    """

    def __init__(self, num_rows: int, teacher_dim: int, student_dim: int, per_token: bool = True):
        super().__init__()
        self.proj: Optional[nn.Parameter] = None
        if teacher_dim != student_dim:
            self.proj = nn.Parameter(
                nn.init.xavier_normal_(torch.empty(teacher_dim, student_dim))
            )
        rows = num_rows if per_token else 1
        self.scale = nn.Parameter(torch.ones(rows, student_dim))
        self.shift = nn.Parameter(torch.zeros(rows, student_dim))

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
    def start_as_slice(self, table: Tensor) -> None:
        if self.proj is not None:
            self.proj.copy_(_selection(*self.proj.shape))
        x = self._project(table)
        self.scale.fill_(1.0)
        # exact per token; with one shared B the mean over tokens (the closest start)
        residual = x - torch.tanh(x)
        self.shift.copy_(residual if self.shift.shape[0] > 1 else residual.mean(0, keepdim=True))


class ProjectionGenerator(ParameterGenerator):
    """docs/method.md 3.7, output projection: W_out = O_T · P_o, no tanh, no A/B.

    teacher: O_T (V, d_T) -> student (V, d_S). When d_S = d_T there is no P_o and
    the teacher's projection is used as is (the authors' choice: nothing trains).
    """

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.proj: Optional[nn.Parameter] = None
        if teacher_dim != student_dim:
            self.proj = nn.Parameter(
                nn.init.xavier_normal_(torch.empty(teacher_dim, student_dim))
            )

    def forward(self, table: Tensor) -> Tensor:
        with fp32_compute(table.device):
            if self.proj is None:
                return table.float()
            return table.float() @ self.proj.float()

    @torch.no_grad()
    def start_as_slice(self, table: Tensor) -> None:
        if self.proj is not None:
            self.proj.copy_(_selection(*self.proj.shape))
