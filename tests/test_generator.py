"""Generator maths against the spec's formulas (einsum, member by member), banks against
their members one by one, initial values, layer groups."""

from types import SimpleNamespace

import pytest
import torch

from wd_fairseq.generator import (
    ElementwiseGenerator,
    MatrixGenerator,
    ProjectionGenerator,
    TableGenerator,
    VectorGenerator,
    stack_members,
)
from wd_fairseq.layer_groups import layer_groups
from wd_fairseq.teacher_layout import lay_out_end_to_end


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def randomize(generator):
    """Move every parameter away from its init so all terms of the formula matter."""
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return generator


def bank(make, count):
    """A bank of ``count`` members, randomized (``make(count)`` builds it)."""
    return randomize(make(count))


def generate(gen, groups):
    return gen.members(gen(gen.teacher_input(groups)))


def member(gen, k):
    """Member k's parameters, as the 2-D tensors of docs/method.md."""
    return SimpleNamespace(**{name: p[k] for name, p in gen.named_parameters()})


def reference_matrix(g, teacher):
    """docs/method.md 3.2 written out: W ∈ R^{O_T×I_T×g}, c = M·v, Ŵ = P_outᵀ W̄ P_in."""
    W = torch.stack(teacher, dim=-1)
    c = torch.einsum("lk,kj->l", g.layer_mix, g.layer_reduce)
    W_bar = torch.einsum("oil,l->oi", W, c)
    W_hat = torch.einsum("os,oi,it->st", g.out_proj, W_bar, g.in_proj)
    return g.scale * torch.tanh(W_hat) + g.shift


def reference_vector(g, teacher):
    """docs/method.md 3.3/3.4: b_s = a ⊙ tanh(Q_outᵀ (b (N u))) + β."""
    b = torch.stack(teacher, dim=-1)
    c = torch.einsum("lk,kj->l", g.layer_mix, g.layer_reduce)
    return g.scale * torch.tanh(torch.einsum("os,o->s", g.out_proj, b @ c)) + g.shift


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
def test_matrix_generator_matches_formula_for_every_member(teacher_shape, student_shape, g):
    gen = bank(lambda n: MatrixGenerator(teacher_shape, student_shape, g, count=n), 3)
    groups = [[torch.randn(teacher_shape) for _ in range(g)] for _ in range(3)]
    for k, out in enumerate(generate(gen, groups)):
        torch.testing.assert_close(out, reference_matrix(member(gen, k), groups[k]), rtol=1e-5, atol=1e-5)


def test_matrix_generator_picks_cheaper_contraction():
    # fc1 of stu1: 2048x512 -> 1024x256. Projecting the input side first is cheaper.
    assert not MatrixGenerator((2048, 512), (1024, 256), 6).project_out_first
    assert MatrixGenerator((512, 2048), (256, 1024), 6).project_out_first
    for teacher_shape, student_shape in (((2048, 512), (1024, 256)), ((512, 2048), (256, 1024))):
        gen = bank(lambda n: MatrixGenerator(teacher_shape, student_shape, 2, count=n), 1)
        teacher = [torch.randn(teacher_shape) for _ in range(2)]
        torch.testing.assert_close(generate(gen, [teacher])[0], reference_matrix(member(gen, 0), teacher),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_vector_generator_matches_formula_for_every_member(g):
    gen = bank(lambda n: VectorGenerator(24, 12, g, count=n), 4)
    groups = [[torch.randn(24) for _ in range(g)] for _ in range(4)]
    for k, out in enumerate(generate(gen, groups)):
        torch.testing.assert_close(out, reference_vector(member(gen, k), groups[k]), rtol=1e-5, atol=1e-5)


def test_elementwise_generator_matches_formula_for_every_member():
    shapes = [(6, 5), (7,), (3, 2)]
    gen = randomize(ElementwiseGenerator(*shapes))
    assert gen.scale.shape == (30 + 7 + 6,)
    groups = [[torch.randn(s)] for s in shapes]
    scales, shifts = gen.members(gen.scale), gen.members(gen.shift)
    for k, out in enumerate(generate(gen, groups)):
        assert out.shape == shapes[k]
        torch.testing.assert_close(out, scales[k] * torch.tanh(groups[k][0]) + shifts[k])


@pytest.mark.parametrize("make,shapes", [
    (lambda n: MatrixGenerator((24, 16), (12, 8), 2, count=n), [(24, 16), (24, 16)]),
    (lambda n: VectorGenerator(24, 12, 3, count=n), [(24,)] * 3),
    (lambda n: ElementwiseGenerator(*[(5, 4)] * n), [(5, 4)]),
], ids=["matrix", "vector", "elementwise"])
def test_a_bank_generates_and_trains_like_its_members_one_by_one(make, shapes):
    """Same random start (members drawn in turn), same values, same gradients (≤ 1e-6)."""
    torch.manual_seed(1)
    alone = [make(1) for _ in range(3)]
    torch.manual_seed(1)
    together = make(3)
    for name, p in together.named_parameters():
        torch.testing.assert_close(p, torch.cat([getattr(a, name) for a in alone]), rtol=0, atol=0)
    groups = [[torch.randn(s) for s in shapes] for _ in range(3)]
    weights = [torch.randn(generate(a, [grp])[0].shape) for a, grp in zip(alone, groups)]
    outs = generate(together, groups)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    for a, grp, w, out in zip(alone, groups, weights, outs):
        single = generate(a, [grp])[0]
        torch.testing.assert_close(out, single, rtol=1e-6, atol=1e-7)
        (single * w).sum().backward()
    for name, p in together.named_parameters():
        expected = torch.cat([getattr(a, name).grad for a in alone])
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make, shapes, g", [
    (lambda: MatrixGenerator((6, 5), (4, 3), 2, count=3), [(6, 5)] * 6, 2),
    (lambda: ElementwiseGenerator((4, 3), (5,), (2, 2)), [(4, 3), (5,), (2, 2)], 1),
])
def test_teacher_laid_out_end_to_end_is_read_without_a_copy_and_gives_the_same_output(make, shapes, g):
    generator = randomize(make())
    tensors = [torch.randn(*shape) for shape in shapes]
    groups = [tensors[i:i + g] for i in range(0, len(tensors), g)]
    copied = generator(generator.teacher_input(groups))
    values = [t.clone() for t in tensors]
    lay_out_end_to_end(tensors)
    assert all(torch.equal(t, v) for t, v in zip(tensors, values))
    storage = tensors[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in tensors)
    x = generator.teacher_input(groups)
    if isinstance(generator, MatrixGenerator):  # the stacked layers are the teacher itself
        assert x.untyped_storage().data_ptr() == storage
    assert torch.equal(generator(x), copied)


def test_scale_shift_backward_equals_addcmul_backward():
    from wd_fairseq.generator import _scale_shift

    scale, x, shift = (torch.randn(4, 5, requires_grad=True) for _ in range(3))
    grad = torch.randn(4, 5)
    ours = torch.autograd.grad(_scale_shift(scale, x, shift), (scale, x, shift), grad)
    torchs = torch.autograd.grad(torch.addcmul(shift, scale, x), (scale, x, shift), grad)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
    constant = x.detach()  # an element-wise bank's input: no gradient for it
    scale_grad, shift_grad = torch.autograd.grad(_scale_shift(scale, constant, shift), (scale, shift), grad)
    assert torch.equal(scale_grad, grad * constant) and torch.equal(shift_grad, grad)


def test_stack_members_turns_per_tensor_state_into_bank_parameters():
    """How a phase-1 checkpoint of one generator per tensor loads as banks."""
    alone = [randomize(MatrixGenerator((8, 6), (4, 3), 2)) for _ in range(2)]
    merged = MatrixGenerator((8, 6), (4, 3), 2, count=2)
    for name, like in merged.named_parameters():
        old = [getattr(a, name)[0] for a in alone]  # per-tensor checkpoints had no member dim
        assert torch.equal(stack_members(old, like), torch.cat([getattr(a, name) for a in alone]))
    flat = ElementwiseGenerator((2, 3), (4,))
    old = [torch.ones(2, 3), torch.zeros(4)]
    assert torch.equal(stack_members(old, flat.scale), torch.tensor([1.0] * 6 + [0.0] * 4))


@pytest.mark.parametrize("teacher_dim,student_dim", [(24, 24), (24, 12)])
def test_table_generator_rows_and_full_table(teacher_dim, student_dim):
    """docs/method.md 3.7: X[y] = A[y] ⊙ tanh(E[y] · P_e) + B[y] (no P_e at equal width)."""
    gen = randomize(TableGenerator(30, teacher_dim, student_dim))
    E = torch.randn(30, teacher_dim)
    projected = E if gen.proj is None else torch.einsum("vd,ds->vs", E, gen.proj)
    expected = gen.scale * torch.tanh(projected) + gen.shift
    torch.testing.assert_close(generate(gen, [[E]])[0], expected, rtol=1e-5, atol=1e-5)
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
    gen.start_as_slice([[E]])  # the closest shared start: the mean residual
    torch.testing.assert_close(gen.shift, (E[:, :12] - torch.tanh(E[:, :12])).mean(0, keepdim=True))


def test_projection_generator():
    """docs/method.md 3.7: W_out = O_T · P_o; the teacher's as is at equal width."""
    O = torch.randn(30, 24)
    gen = randomize(ProjectionGenerator(24, 12))
    torch.testing.assert_close(generate(gen, [[O]])[0], torch.einsum("vd,ds->vs", O, gen.proj),
                               rtol=1e-5, atol=1e-5)
    same = ProjectionGenerator(24, 24)
    assert list(same.parameters()) == []
    torch.testing.assert_close(generate(same, [[O]])[0], O)


def test_initial_values_follow_the_spec():
    g = 3
    gen = MatrixGenerator((64, 48), (32, 24), g)
    assert torch.equal(gen.layer_reduce, torch.full((1, g, 1), 1 / g))
    assert torch.equal(gen.scale, torch.ones(1, 32, 24)) and torch.equal(gen.shift, torch.zeros(1, 32, 24))
    # xavier normal: std sqrt(2 / (fan_in + fan_out))
    for p, (a, b) in ((gen.out_proj[0], (64, 32)), (gen.in_proj[0], (48, 24))):
        assert p.shape == (a, b)
        assert abs(p.std().item() - (2 / (a + b)) ** 0.5) < 0.15 * (2 / (a + b)) ** 0.5
    assert abs(p.mean().item()) < 0.05
    vec = VectorGenerator(64, 32, g)
    assert torch.equal(vec.layer_reduce, torch.full((1, g, 1), 1 / g))
    assert torch.equal(vec.scale, torch.ones(1, 32)) and torch.equal(vec.shift, torch.zeros(1, 32))
    # 3.6 element-wise at init is tanh(X_t), not X_t
    x = torch.randn(10)
    torch.testing.assert_close(generate(ElementwiseGenerator((10,)), [[x]])[0], torch.tanh(x))
    table = TableGenerator(30, 24, 24)
    assert torch.equal(table.scale, torch.ones(30, 24)) and torch.equal(table.shift, torch.zeros(30, 24))


def test_slice_initialisation_reproduces_a_teacher_slice_in_every_member():
    groups = [[torch.randn(24, 40) for _ in range(2)] for _ in range(3)]
    gen = bank(lambda n: MatrixGenerator((24, 40), (12, 20), 2, count=n), 3)
    gen.start_as_slice(groups)
    for out, (a, b) in zip(generate(gen, groups), groups):
        torch.testing.assert_close(out, ((a + b) / 2)[:12, :20])
    vec = bank(lambda n: VectorGenerator(24, 12, 1, count=n), 2)
    vectors = [[torch.randn(24)] for _ in range(2)]
    vec.start_as_slice(vectors)
    for out, (b,) in zip(generate(vec, vectors), vectors):
        torch.testing.assert_close(out, b[:12])
    flat = randomize(ElementwiseGenerator((3, 4), (5,)))
    tensors = [[torch.randn(3, 4)], [torch.randn(5)]]
    flat.start_as_slice(tensors)
    for out, (t,) in zip(generate(flat, tensors), tensors):
        torch.testing.assert_close(out, t)


def test_generators_compute_in_fp32_from_half_inputs():
    """Half parameters and teacher tensors whose products overflow fp16 (> 65504)."""
    half = bank(lambda n: MatrixGenerator((24, 24), (12, 12), 2, count=n), 2).half()
    groups = [[(torch.randn(24, 24) * 2e4).half() for _ in range(2)] for _ in range(2)]
    x = half.teacher_input(groups)
    assert x.dtype == torch.float32
    outs = half.members(half(x))
    first = member(half, 0)
    fp16_product = first.out_proj.t() @ (groups[0][0] * first.layer_mix[0, 0])
    assert not torch.isfinite(fp16_product).all()  # what computing in half would do
    for k, out in enumerate(outs):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        expected = reference_matrix(member(half.float(), k), [t.float() for t in groups[k]])
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
