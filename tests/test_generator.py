"""Generator maths against the spec's formulas (einsum), initial values, layer groups."""

import pytest
import torch

from wd_fairseq.generator import (
    ElementwiseGenerator,
    MatrixGenerator,
    ProjectionGenerator,
    TableGenerator,
    VectorGenerator,
)
from wd_fairseq.layer_groups import layer_groups


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def randomize(generator):
    """Move every parameter away from its init so all terms of the formula matter."""
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return generator


def reference_matrix(g, teacher):
    """docs/method.md 3.2 written out: W ∈ R^{O_T×I_T×g}, c = M·v, Ŵ = P_outᵀ W̄ P_in."""
    W = torch.stack(teacher, dim=-1)
    c = torch.einsum("lk,kj->l", g.layer_mix, g.layer_reduce)
    W_bar = torch.einsum("oil,l->oi", W, c)
    W_hat = torch.einsum("os,oi,it->st", g.out_proj, W_bar, g.in_proj)
    return g.scale * torch.tanh(W_hat) + g.shift


@pytest.mark.parametrize(
    "teacher_shape,student_shape,g",
    [
        ((24, 24), (12, 12), 3),   # self-attention q/k/v/out, width halved, 3 layers
        ((24, 40), (12, 40), 2),   # cross-attention k/v: input width d_E kept
        ((48, 24), (20, 12), 1),   # fc1, one teacher layer
        ((24, 48), (12, 20), 2),   # fc2
        ((24, 24), (24, 24), 2),   # same shape, two layers: full generator
    ],
)
def test_matrix_generator_matches_formula(teacher_shape, student_shape, g):
    gen = randomize(MatrixGenerator(teacher_shape, student_shape, g))
    teacher = [torch.randn(teacher_shape) for _ in range(g)]
    torch.testing.assert_close(gen(*teacher), reference_matrix(gen, teacher), rtol=1e-5, atol=1e-5)


def test_matrix_generator_picks_cheaper_contraction():
    # fc1 of stu1: 2048x512 -> 1024x256. Projecting the input side first is cheaper.
    assert not MatrixGenerator((2048, 512), (1024, 256), 6).project_out_first
    assert MatrixGenerator((512, 2048), (256, 1024), 6).project_out_first
    for teacher_shape, student_shape in (((2048, 512), (1024, 256)), ((512, 2048), (256, 1024))):
        gen = randomize(MatrixGenerator(teacher_shape, student_shape, 2))
        teacher = [torch.randn(teacher_shape) for _ in range(2)]
        torch.testing.assert_close(gen(*teacher), reference_matrix(gen, teacher), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_vector_generator_matches_formula(g):
    """docs/method.md 3.3/3.4: b_s = a ⊙ tanh(Q_outᵀ (b (N u))) + β (biases and LayerNorms)."""
    gen = randomize(VectorGenerator(24, 12, g))
    teacher = [torch.randn(24) for _ in range(g)]
    b = torch.stack(teacher, dim=-1)
    c = torch.einsum("lk,kj->l", gen.layer_mix, gen.layer_reduce)
    expected = gen.scale * torch.tanh(torch.einsum("os,o->s", gen.out_proj, b @ c)) + gen.shift
    torch.testing.assert_close(gen(*teacher), expected, rtol=1e-5, atol=1e-5)


def test_elementwise_generator_matches_formula():
    gen = randomize(ElementwiseGenerator((6, 5)))
    x = torch.randn(6, 5)
    torch.testing.assert_close(gen(x), gen.scale * torch.tanh(x) + gen.shift)


@pytest.mark.parametrize("teacher_dim,student_dim", [(24, 24), (24, 12)])
def test_table_generator_rows_and_full_table(teacher_dim, student_dim):
    """docs/method.md 3.7: X[y] = A[y] ⊙ tanh(E[y] · P_e) + B[y] (no P_e at equal width)."""
    gen = randomize(TableGenerator(30, teacher_dim, student_dim))
    E = torch.randn(30, teacher_dim)
    projected = E if gen.proj is None else torch.einsum("vd,ds->vs", E, gen.proj)
    expected = gen.scale * torch.tanh(projected) + gen.shift
    torch.testing.assert_close(gen(E), expected, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([7, 3, 29])
    torch.testing.assert_close(gen.rows(E, rows), expected[rows], rtol=1e-5, atol=1e-5)
    assert (gen.proj is None) == (teacher_dim == student_dim)


def test_table_generator_with_one_scale_for_every_token():
    """--wd-table-scale shared: X[y] = A ⊙ tanh(E[y] · P) + B with A, B (1, d_S): the
    generator's size does not depend on the vocabulary."""
    gen = randomize(TableGenerator(30, 24, 12, per_token=False))
    assert gen.scale.shape == gen.shift.shape == (1, 12)
    assert sum(p.numel() for p in gen.parameters()) == 24 * 12 + 2 * 12
    E = torch.randn(30, 24)
    expected = gen.scale * torch.tanh(E @ gen.proj) + gen.shift
    torch.testing.assert_close(gen(E), expected, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([7, 3, 29])
    torch.testing.assert_close(gen.rows(E, rows), expected[rows], rtol=1e-5, atol=1e-5)
    gen.start_as_slice(E)  # the closest shared start: the mean residual
    torch.testing.assert_close(gen.shift, (E[:, :12] - torch.tanh(E[:, :12])).mean(0, keepdim=True))


def test_projection_generator():
    """docs/method.md 3.7: W_out = O_T · P_o; the teacher's as is at equal width."""
    O = torch.randn(30, 24)
    gen = randomize(ProjectionGenerator(24, 12))
    torch.testing.assert_close(gen(O), torch.einsum("vd,ds->vs", O, gen.proj), rtol=1e-5, atol=1e-5)
    same = ProjectionGenerator(24, 24)
    assert list(same.parameters()) == []
    torch.testing.assert_close(same(O), O)


def test_initial_values_follow_the_spec():
    g = 3
    gen = MatrixGenerator((64, 48), (32, 24), g)
    assert torch.equal(gen.layer_reduce, torch.full((g, 1), 1 / g))
    assert torch.equal(gen.scale, torch.ones(32, 24)) and torch.equal(gen.shift, torch.zeros(32, 24))
    # xavier normal: std sqrt(2 / (fan_in + fan_out))
    for p, (a, b) in ((gen.out_proj, (64, 32)), (gen.in_proj, (48, 24))):
        assert p.shape == (a, b)
        assert abs(p.std().item() - (2 / (a + b)) ** 0.5) < 0.15 * (2 / (a + b)) ** 0.5
    assert abs(p.mean().item()) < 0.05
    vec = VectorGenerator(64, 32, g)
    assert torch.equal(vec.layer_reduce, torch.full((g, 1), 1 / g))
    assert torch.equal(vec.scale, torch.ones(32)) and torch.equal(vec.shift, torch.zeros(32))
    # 3.6 element-wise at init is tanh(X_t), not X_t
    x = torch.randn(10)
    torch.testing.assert_close(ElementwiseGenerator((10,))(x), torch.tanh(x))
    table = TableGenerator(30, 24, 24)
    assert torch.equal(table.scale, torch.ones(30, 24)) and torch.equal(table.shift, torch.zeros(30, 24))


def test_slice_initialisation_reproduces_a_teacher_slice():
    teacher = [torch.randn(24, 40) for _ in range(2)]
    gen = MatrixGenerator((24, 40), (12, 20), 2)
    gen.start_as_slice(*teacher)
    torch.testing.assert_close(gen(*teacher), ((teacher[0] + teacher[1]) / 2)[:12, :20])
    vec = VectorGenerator(24, 12, 1)
    b = torch.randn(24)
    vec.start_as_slice(b)
    torch.testing.assert_close(vec(b), b[:12])


def test_generators_compute_in_fp32_from_half_inputs():
    """Half parameters and teacher tensors whose products overflow fp16 (> 65504)."""
    half = randomize(MatrixGenerator((24, 24), (12, 12), 2)).half()
    teacher = [(torch.randn(24, 24) * 2e4).half() for _ in range(2)]
    out = half(*teacher)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    fp16_product = half.out_proj.t() @ (teacher[0] * half.layer_mix[0, 0])
    assert not torch.isfinite(fp16_product).all()  # what computing in half would do
    expected = reference_matrix(half.float(), [t.float() for t in teacher])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "teacher,student,expected",
    [
        (6, 1, [range(0, 6)]),
        (6, 2, [range(0, 3), range(3, 6)]),
        (6, 3, [range(0, 2), range(2, 4), range(4, 6)]),
        (6, 6, [range(i, i + 1) for i in range(6)]),
        (6, 4, [range(0, 1), range(1, 3), range(3, 4), range(4, 6)]),
        (5, 2, [range(0, 2), range(2, 5)]),
        (7, 3, [range(0, 2), range(2, 4), range(4, 7)]),
    ],
)
def test_layer_groups(teacher, student, expected):
    groups = layer_groups(teacher, student)
    assert groups == expected
    assert [j for grp in groups for j in grp] == list(range(teacher))  # every layer, once
    sizes = [len(grp) for grp in groups]
    assert max(sizes) - min(sizes) <= 1
    if teacher % student == 0:  # the authors' rule exactly
        g = teacher // student
        assert groups == [range(i * g, (i + 1) * g) for i in range(student)]


@pytest.mark.parametrize("teacher,student", [(6, 0), (3, 4)])
def test_layer_groups_reject_impossible_depths(teacher, student):
    with pytest.raises(ValueError, match="student"):
        layer_groups(teacher, student)
