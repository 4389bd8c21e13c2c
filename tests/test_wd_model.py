"""The phase-1 model in process: bookkeeping, banks, caching, precision, teacher formats,
old checkpoints, errors."""

import argparse
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_FLAGS, USER_DIR, build_wd, probe_loss, run_cli, translation_task
from test_generator import member, reference_matrix, reference_vector
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer import TransformerModel

from wd_fairseq.generator import (
    ElementwiseGenerator,
    MatrixGenerator,
    TableGenerator,
    VectorGenerator,
)
from wd_fairseq.model import WDTransformerModel
from wd_fairseq.parametrization import GeneratedTensor
from wd_fairseq.teacher import WDSetupError

#: a phase-1 run of the per-tensor generators (before banks): see its make.py
PER_TENSOR = Path(__file__).parent / "data" / "per_tensor_phase1"

STUDENT = dict(encoder_layers=2, decoder_layers=1, decoder_embed_dim=16,
               decoder_ffn_embed_dim=24, decoder_attention_heads=2)


def batch(model, seed=0, bsz=3):
    g = torch.Generator().manual_seed(seed)
    vocab = model.encoder.embed_tokens.num_embeddings
    src = torch.randint(4, vocab, (bsz, 6), generator=g)
    prev = torch.randint(4, vocab, (bsz, 5), generator=g)
    return src, torch.full((bsz,), 6), prev


def student_logits(model, seed=0):
    src, lengths, prev = batch(model, seed)
    return model(src, lengths, prev)[0]


@pytest.fixture(scope="module")
def wd(data_bin, postnorm_teacher):
    torch.manual_seed(1)
    return build_wd(data_bin, postnorm_teacher, **STUDENT)


def test_every_student_tensor_is_generated_and_only_generators_train(wd):
    trainable = {id(p) for p in wd.parameters() if p.requires_grad}
    generator_params = {id(p) for bank in wd.generator_banks.values() for p in bank.generator.parameters()}
    assert trainable == generator_params
    assert not any(p.requires_grad for p in wd.teacher.parameters())
    for name, p in wd.named_parameters():
        if name.endswith(".original"):
            assert p.numel() == 0 and not p.requires_grad  # no student copy is stored
    # Every stock key of the student has a value, and every value comes from a generator.
    stock = wd.student_state_dict()
    generated = {f"{n}.{t}" for n, m in wd.named_modules() for t in getattr(m, "parametrizations", {})}
    assert {k for k in stock if k.endswith(("weight", "bias"))} <= generated


def test_generator_kinds_follow_shapes_and_groups(wd):
    kinds = {}
    for module, name, g in wd.generated_tensors():
        path = next(n for n, m in wd.named_modules() if m is module)
        kinds[f"{path}.{name}"] = (type(g.bank.generator), g.sources)
    # encoder layer 0 <- teacher layer 0 (group of one, same shape): element-wise
    assert kinds["encoder.layers.0.fc1.weight"] == (ElementwiseGenerator, ["encoder.layers.0.fc1.weight"])
    # encoder layer 1 <- teacher layers 1, 2 (3 layers into 2 groups): full generator
    assert kinds["encoder.layers.1.fc1.weight"] == (
        MatrixGenerator, ["encoder.layers.1.fc1.weight", "encoder.layers.2.fc1.weight"])
    # decoder: 1 layer from all 3, narrower
    typ, sources = kinds["decoder.layers.0.encoder_attn.k_proj.weight"]
    assert typ is MatrixGenerator and len(sources) == 3
    assert kinds["decoder.layers.0.self_attn_layer_norm.weight"][0] is VectorGenerator
    assert kinds["decoder.embed_tokens.weight"][0] is TableGenerator
    assert kinds["encoder.embed_tokens.weight"][0] is TableGenerator
    # cross-attention k/v read the encoder output: input width d_E = 32, output d_S = 16
    k_gen = wd.decoder.layers[0].encoder_attn.k_proj.parametrizations.weight[0].bank.generator
    assert k_gen.in_proj.shape[1:] == (32, 32) and k_gen.out_proj.shape[1:] == (32, 16)
    assert wd.decoder.layers[0].encoder_attn.k_proj.weight.shape == (16, 32)


@pytest.mark.parametrize("student", [STUDENT, dict(encoder_layers=2, decoder_layers=1)],
                         ids=["narrower", "teacher-width"])
def test_teacher_is_frozen_and_unchanged_by_training(data_bin, postnorm_teacher, student):
    """Also across validation (eval mode), and at the teacher's width, where the output
    projection is the teacher's tensor as is."""
    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, **student)
    before_teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in model.student_state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model.train()
        optimizer.zero_grad()
        student_logits(model, seed=step).logsumexp(-1).mean().backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        optimizer.step()
        model.eval()
        with torch.no_grad():
            student_logits(model)
        assert not any(p.requires_grad for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k]), k
    after = model.student_state_dict()
    changed = [k for k in after if after[k].dtype.is_floating_point and not torch.equal(after[k], before_student[k])]
    assert "decoder.layers.0.fc1.weight" in changed and "encoder.embed_tokens.weight" in changed


def count_generator_calls(model):
    calls = []
    for bank in model.generator_banks.values():
        bank.generator.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_eval_mode_caches_generated_weights_and_never_goes_stale(data_bin, postnorm_teacher):
    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, **STUDENT)
    n = len(model.generator_banks)
    calls = count_generator_calls(model)
    model.eval()
    with torch.no_grad():
        first = student_logits(model)
        assert len(calls) == n  # each bank ran once
        for _ in range(3):
            student_logits(model)
        assert len(calls) == n  # ... and never again
    # An in-place update of a generator parameter (as an optimizer step does).
    gen = model.decoder.layers[0].fc1.parametrizations.weight[0].bank.generator
    with torch.no_grad():
        gen.shift.add_(0.5)
        changed = student_logits(model)
    assert not torch.allclose(first, changed)
    reference = build_wd(data_bin, postnorm_teacher, **STUDENT)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(changed, student_logits(reference))
        # Loading a state dict refreshes the cache too.
        model.load_state_dict(build_wd(data_bin, postnorm_teacher, **STUDENT).state_dict())
        assert not torch.allclose(changed, student_logits(model))
    # Training mode never uses the cache.
    model.train()
    calls.clear()
    student_logits(model)
    assert len(calls) == n - 2  # all but the two token tables, which generate only rows


def test_eval_cache_sees_optimizer_steps_and_assigned_state_dicts(data_bin, postnorm_teacher):
    """A custom loop that stays in eval mode: fairseq's Adam writes ``p.data`` (no version
    counter moves), ``load_state_dict(assign=True)`` replaces the parameters."""
    from fairseq.optim.adam import Adam

    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, **STUDENT)
    model.eval()
    with torch.no_grad():
        before = student_logits(model)  # fills the cache
    optimizer = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    student_logits(model).sum().backward()
    optimizer.step()
    reference = build_wd(data_bin, postnorm_teacher, **STUDENT)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        after = student_logits(model)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, student_logits(reference), rtol=0, atol=0)
        other = build_wd(data_bin, postnorm_teacher, **STUDENT).eval()
        torch.nn.Module.load_state_dict(model, other.state_dict(), assign=True)
        torch.testing.assert_close(student_logits(model), student_logits(other), rtol=0, atol=0)


def test_eval_reads_skip_torch_parametrization_and_copies_keep_their_own_cache(wd, monkeypatch):
    from torch.nn.utils import parametrize

    model = build_wd_copy(wd)
    model.eval()
    with torch.no_grad():
        first = student_logits(model)
        calls = []
        forward = parametrize.ParametrizationList.forward
        monkeypatch.setattr(parametrize.ParametrizationList, "forward",
                            lambda self: calls.append(1) or forward(self))
        torch.testing.assert_close(student_logits(model), first, rtol=0, atol=0)
        assert not calls  # cached reads bypass torch's parametrization call
        copy = build_wd_copy(model)  # shares the parametrized classes with ``model``
        copy.decoder.layers[0].fc1.parametrizations.weight[0].bank.generator.shift.add_(0.5)
        assert not torch.allclose(student_logits(copy), first)
        torch.testing.assert_close(student_logits(model), first, rtol=0, atol=0)


def test_beam_search_in_eval_mode_matches_the_materialised_model(data_bin, wd):
    """Beam search reorders the incremental state of every attention module; the
    phase-1 decoder skips only the parametrization modules when it does."""
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator
    from torch.nn.utils import parametrize

    task = translation_task(data_bin)
    src, lengths, _ = batch(wd, seed=3, bsz=4)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}

    def beam_search(model):
        generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=8,
                                      search_strategy=search.BeamSearch(task.target_dictionary))
        return [[h["tokens"].tolist() for h in hypos] for hypos in generator.generate([model], sample)]

    stock = TransformerModel.build_model(argparse.Namespace(**wd.student_args), task)
    stock.load_state_dict(wd.student_state_dict())
    expected = beam_search(stock)
    assert beam_search(build_wd_copy(wd)) == expected
    args = options.parse_args_and_arch(options.get_generation_parser(), [str(data_bin)])
    materialised = build_wd_copy(wd)
    materialised.prepare_for_inference_(convert_namespace_to_omegaconf(args))
    assert beam_search(materialised) == expected
    assert parametrize.is_parametrized(wd.decoder.layers[0].fc1)  # copies are independent


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_for_inference_materialises_in_place(data_bin, postnorm_teacher, tied):
    """fairseq-generate's prepare_for_inference_ leaves a plain student: same outputs,
    no generators or teacher, tied tables still one Parameter, training refused."""
    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, share_decoder_input_output_embed=tied, **STUDENT)
    model.eval()
    with torch.no_grad():
        before = student_logits(model)
    args = options.parse_args_and_arch(options.get_generation_parser(), [str(data_bin)])
    model.prepare_for_inference_(convert_namespace_to_omegaconf(args))
    assert not hasattr(model, "teacher")
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    assert type(model.decoder.layers[0].fc1) is torch.nn.Linear
    decoder = model.decoder
    assert (decoder.output_projection.weight is decoder.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(student_logits(model), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot train"):
        model.train()


def test_training_generates_only_the_embedding_rows_in_the_batch(data_bin, postnorm_teacher, monkeypatch):
    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, **STUDENT)
    sizes = []
    original_rows = TableGenerator.rows
    monkeypatch.setattr(TableGenerator, "rows", lambda self, table, index=None: (
        sizes.append(None if index is None else len(index)), original_rows(self, table, index))[1])
    model.train()
    src, lengths, prev = batch(model)
    out = model.encoder.embed_tokens(src)
    assert sizes == [len(torch.unique(src))] and sizes[0] < model.encoder.embed_tokens.num_embeddings
    torch.testing.assert_close(out, torch.nn.functional.embedding(src, model.encoder.embed_tokens.weight))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_half_precision_model_matches_fp32(wd, dtype, tol):
    model = build_wd_copy(wd)
    model.eval()
    with torch.no_grad():
        reference = model.get_normalized_probs((student_logits(model), None), log_probs=False)
        model.to(dtype)
        low = model.get_normalized_probs((student_logits(model), None), log_probs=False)
    assert low.dtype == torch.float32 or low.dtype == dtype
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, rtol=0, atol=tol)


def build_wd_copy(model):
    import copy
    return copy.deepcopy(model)


def test_old_fused_in_proj_teacher_loads_like_the_modern_one(data_bin, postnorm_teacher, tmp_path):
    state = torch.load(postnorm_teacher, weights_only=True)
    model = state["model"]
    for key in [k for k in model if k.endswith("q_proj.weight")]:
        prefix = key[: -len("q_proj.weight")]
        for what in ("weight", "bias"):
            parts = [model.pop(f"{prefix}{p}_proj.{what}") for p in ("q", "k", "v")]
            model[f"{prefix}in_proj_{what}"] = torch.cat(parts)
    old = tmp_path / "old_teacher.pt"
    torch.save(state, old)
    a = build_wd(data_bin, postnorm_teacher, **STUDENT).teacher.state_dict()
    b = build_wd(data_bin, old, **STUDENT).teacher.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_presets_set_the_authors_students_and_flags_override():
    import wd_fairseq  # noqa: F401

    def parse(*argv):
        parser = options.get_training_parser()
        return options.parse_args_and_arch(parser, ["data", *argv])

    stu1 = parse("--arch", "wd_transformer_stu1", "--teacher-path", "t.pt")
    assert (stu1.decoder_layers, stu1.decoder_embed_dim, stu1.decoder_ffn_embed_dim,
            stu1.decoder_attention_heads) == (1, 256, 1024, 8)
    assert getattr(stu1, "encoder_layers", None) is None  # the teacher's
    stu2 = parse("--arch", "wd_transformer_stu2", "--teacher-path", "t.pt", "--decoder-layers", "3")
    assert (stu2.decoder_layers, stu2.decoder_embed_dim) == (3, 512)
    base = parse("--arch", "wd_transformer", "--teacher-path", "t.pt")
    assert getattr(base, "decoder_layers", None) is None


# -- clear errors -----------------------------------------------------------------


def test_error_missing_teacher(data_bin, tmp_path):
    with pytest.raises(WDSetupError, match=r"--teacher-path .*missing\.pt: no such file\. Fix"):
        build_wd(data_bin, tmp_path / "missing.pt")


def test_error_truncated_teacher(data_bin, postnorm_teacher, tmp_path):
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(postnorm_teacher.read_bytes()[:5000])
    with pytest.raises(WDSetupError, match=r"truncated\.pt: cannot be read as a fairseq checkpoint.*Fix"):
        build_wd(data_bin, broken)


def test_error_checkpoint_with_unsafe_objects(data_bin, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": shutil.copytree}, evil)
    with pytest.raises(WDSetupError, match=r"evil\.pt: holds a Python object \(shutil\.copytree\) that safe loading.*refuses.*Fix"):
        build_wd(data_bin, evil)


def test_error_not_a_translation_transformer(data_bin, postnorm_teacher, tmp_path):
    state = torch.load(postnorm_teacher, weights_only=True)
    state["cfg"]["model"].arch = "transformer_lm"
    state["cfg"]["model"]._name = "transformer_lm"
    lm = tmp_path / "lm.pt"
    torch.save(state, lm)
    with pytest.raises(WDSetupError, match=r"lm\.pt: arch 'transformer_lm' is not a fairseq translation Transformer.*Fix"):
        build_wd(data_bin, lm)


def test_error_teacher_vocabulary_size_differs(joined_data_bin, postnorm_teacher):
    with pytest.raises(WDSetupError, match=r"source vocabulary has \d+ entries but the data's source dictionary has \d+.*--srcdict"):
        build_wd(joined_data_bin, postnorm_teacher)


def test_error_teacher_dictionary_symbols_differ(data_bin, postnorm_teacher, tmp_path):
    other = tmp_path / "data-bin"
    shutil.copytree(data_bin, other)
    lines = (other / "dict.tgt.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    (other / "dict.tgt.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(WDSetupError, match=r"dict\.tgt\.txt, which differs from the data's target dictionary.*--tgtdict"):
        build_wd(other, postnorm_teacher)


@pytest.mark.parametrize("flags,message", [
    (dict(decoder_attention_heads=3), r"--decoder-attention-heads 3 does not divide --decoder-embed-dim 32"),
    (dict(encoder_layers=4), r"--encoder-layers 4: a WD student needs between 1 and the teacher's 3"),
    (dict(decoder_layers=0), r"--decoder-layers 0: a WD student needs between 1"),
    (dict(share_all_embeddings=True, decoder_embed_dim=16, decoder_attention_heads=2),
     r"--share-all-embeddings needs equal student widths"),
])
def test_error_impossible_student_shapes(joined_data_bin, shared_teacher, flags, message):
    with pytest.raises(WDSetupError, match=message):
        build_wd(joined_data_bin, shared_teacher, **flags)


def test_shared_teacher_and_student_tables(joined_data_bin, shared_teacher):
    torch.manual_seed(0)
    model = build_wd(joined_data_bin, shared_teacher, share_all_embeddings=True, decoder_layers=1)
    assert model.encoder.embed_tokens is model.decoder.embed_tokens
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.output_projection.weight, model.decoder.embed_tokens.weight)
    state = model.student_state_dict()
    assert torch.equal(state["encoder.embed_tokens.weight"], state["decoder.output_projection.weight"])
    # The teacher's one shared table is stored once.
    teacher = model.teacher
    assert teacher.encoder.embed_tokens.weight is teacher.decoder.output_projection.weight
    assert isinstance(model.decoder.embed_tokens.parametrizations.weight[0], GeneratedTensor)
    assert isinstance(model, WDTransformerModel)
    assert isinstance(argparse.Namespace(**model.student_args), argparse.Namespace)


def test_encoder_and_decoder_both_shrink_and_materialise_exactly(data_bin, prenorm_teacher):
    """Depth and width of both sides shrink; the stock student built from the
    generated state dict gives the phase-1 outputs."""
    from fairseq.models.transformer import TransformerModel

    torch.manual_seed(0)
    flags = dict(encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=20,
                 encoder_attention_heads=2, decoder_layers=2, decoder_embed_dim=8,
                 decoder_ffn_embed_dim=12, decoder_attention_heads=2,
                 share_decoder_input_output_embed=True)
    model = build_wd(data_bin, prenorm_teacher, **flags)
    k = model.decoder.layers[0].encoder_attn.k_proj.parametrizations.weight[0].bank.generator
    assert k.in_proj.shape[1:] == (32, 16) and model.decoder.layers[0].encoder_attn.k_proj.weight.shape == (8, 16)
    assert model.encoder.embed_tokens.parametrizations.weight[0].bank.generator.proj.shape == (32, 16)
    assert model.encoder.layer_norm.weight.shape == (16,)  # pre-norm final norm, generated too
    stock = TransformerModel.build_model(argparse.Namespace(**model.student_args), translation_task(data_bin))
    stock.load_state_dict(model.student_state_dict(), strict=True)
    model.eval(), stock.eval()
    with torch.no_grad():
        src, lengths, prev = batch(model, seed=3)
        torch.testing.assert_close(stock(src, lengths, prev)[0], model(src, lengths, prev)[0], rtol=0, atol=1e-5)


# -- generator banks ----------------------------------------------------------------


def reference_tensor(bank, k):
    """Member k of ``bank`` from the formulas of docs/method.md (einsum, member by member)."""
    gen, teacher = bank.generator, [t.float() for t in bank.teacher_tensors(k)]
    if isinstance(gen, MatrixGenerator):
        return reference_matrix(member(gen, k), teacher)
    if isinstance(gen, VectorGenerator):
        return reference_vector(member(gen, k), teacher)
    if isinstance(gen, ElementwiseGenerator):
        scale, shift = gen.members(gen.scale)[k], gen.members(gen.shift)[k]
        return scale * torch.tanh(teacher[0]) + shift
    projected = teacher[0] if gen.proj is None else teacher[0] @ gen.proj
    if isinstance(gen, TableGenerator):
        return gen.scale * torch.tanh(projected) + gen.shift
    return projected


@pytest.mark.parametrize("case", ["postnorm", "prenorm-tied-both-shrink", "shared-all", "slice",
                                  "shared-table-scale"])
def test_every_generated_tensor_follows_the_formula_of_its_bank_member(
        case, data_bin, joined_data_bin, postnorm_teacher, prenorm_teacher, shared_teacher):
    torch.manual_seed(0)
    data, teacher, flags = data_bin, postnorm_teacher, dict(STUDENT)
    if case == "prenorm-tied-both-shrink":
        teacher = prenorm_teacher
        flags.update(encoder_embed_dim=16, encoder_ffn_embed_dim=20, encoder_attention_heads=2,
                     share_decoder_input_output_embed=True)
    elif case == "shared-all":
        data, teacher = joined_data_bin, shared_teacher
        flags = dict(decoder_layers=1, share_all_embeddings=True)
    elif case == "slice":
        flags["wd_init"] = "slice"
    elif case == "shared-table-scale":
        flags["wd_table_scale"] = "shared"
    model = build_wd(data, teacher, **flags)
    if case != "slice":  # move every generator parameter away from its init
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    checked = 0
    with torch.no_grad():
        for module, name, generated in model.generated_tensors():
            expected = reference_tensor(generated.bank, generated.index)
            torch.testing.assert_close(getattr(module, name), expected, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == sum(len(bank.names) for bank in model.generator_banks.values())
    kinds = {type(bank.generator) for bank in model.generator_banks.values()}
    assert {MatrixGenerator, VectorGenerator, TableGenerator} <= kinds
    if case == "slice":  # a slice of the teacher at step 0
        fc1 = model.encoder.layers[0].fc1.weight
        torch.testing.assert_close(fc1, model.teacher.encoder.layers[0].fc1.weight)


def test_banks_group_tensors_by_kind_and_shape(wd):
    banks = wd.generator_banks
    elementwise = banks["elementwise_0"]
    assert not any(key.startswith("elementwise_1") for key in banks)  # 4M elements at most each
    assert all(name.startswith("encoder.layers.0.") for name in elementwise.names)
    assert len(elementwise.generator.scale.shape) == 1  # one flat buffer
    fc1 = wd.decoder.layers[0].fc1.parametrizations.weight[0].bank
    assert isinstance(fc1.generator, MatrixGenerator)
    q, k = (getattr(wd.decoder.layers[0].self_attn, f).parametrizations.weight[0].bank
            for f in ("q_proj", "k_proj"))
    assert q is k and len(q.names) >= 4 and q.generator.out_proj.shape[0] == len(q.names)
    members = sum(len(bank.names) for bank in banks.values())
    assert members == len(list(wd.generated_tensors()))
    assert len(banks) < members / 4


def test_one_forward_runs_every_bank_once_and_tied_tables_once(data_bin, postnorm_teacher, monkeypatch):
    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, share_decoder_input_output_embed=True, **STUDENT)
    calls = count_generator_calls(model)
    rows = []
    original_rows = TableGenerator.rows
    monkeypatch.setattr(TableGenerator, "rows", lambda self, table, index=None: (
        rows.append(index is None), original_rows(self, table, index))[1])
    model.train()
    for step in range(2):
        calls.clear(), rows.clear()
        logits = student_logits(model, seed=step)
        # every bank once; the encoder table generates only its batch rows (not a forward),
        # the tied decoder table once, whole, for the projection and the embedding alike
        assert len(calls) == len(model.generator_banks) - 1
        assert rows == [False, True]
        logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_per_tensor_phase1_checkpoint_materialises_to_the_same_student(data_bin, tmp_path):
    """A phase-1 checkpoint written before banks (tests/data/per_tensor_phase1/make.py):
    its per-tensor generators load as banks; wd-materialize writes the old student
    (the data-bin it was made on, in make.py's temporary directory, is this toy corpus's)."""
    run_cli("wd-materialize", PER_TENSOR / "checkpoint_last.pt", tmp_path / "student.pt",
            "--data", data_bin)
    new = torch.load(tmp_path / "student.pt", weights_only=True)["model"]
    old = torch.load(PER_TENSOR / "student.pt", weights_only=True)["model"]
    assert new.keys() == old.keys()
    for key in old:
        torch.testing.assert_close(new[key], old[key], rtol=1e-6, atol=1e-7)


def test_a_per_tensor_phase1_checkpoint_trains_like_before(data_bin):
    """Generator gradients of the converted model equal the per-tensor code's (grads.pt).
    fp32 sums in another order: norm-relative 1e-5 (measured: 4e-6 at worst, the layer
    mixes of LayerNorm gains, whose gradients are sums with cancellation)."""
    from fairseq import checkpoint_utils

    model = checkpoint_utils.load_model_ensemble(
        [str(PER_TENSOR / "checkpoint_last.pt")], arg_overrides={"data": str(data_bin)})[0][0]
    probe_loss(model).backward()
    old = torch.load(PER_TENSOR / "grads.pt", weights_only=True)
    new = {}
    for bank in model.generator_banks.values():
        gen = bank.generator
        for param_name, p in gen.named_parameters():
            if isinstance(gen, ElementwiseGenerator):
                grads = gen.members(p.grad)
            elif isinstance(gen, (MatrixGenerator, VectorGenerator)):
                grads = list(p.grad.unbind(0))
            else:
                grads = [p.grad]
            for tensor, grad in zip(bank.names, grads):
                module_path, _, tensor_name = tensor.rpartition(".")
                new[f"{module_path}.parametrizations.{tensor_name}.0.generator.{param_name}"] = grad
    assert new.keys() == old.keys() and len(old) > 200
    for key, grad in old.items():
        # (the key biases' gradients are zero but for rounding, ~1e-12: the floor)
        error = (new[key].double() - grad.double()).norm()
        assert error <= 1e-5 * grad.double().norm() + 1e-9, (key, error.item())


@pytest.mark.parametrize("layout", ["one generator per student tensor",
                                    "one bank for every element-wise tensor"])
def test_resuming_an_older_phase1_run_needs_reset_optimizer(data_bin, postnorm_teacher, tmp_path, layout):
    save = tmp_path / "phase1"
    save.mkdir()
    flags = [data_bin, "--user-dir", USER_DIR, "--arch", "wd_transformer", "--encoder-layers", "2",
             "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "24",
             "--decoder-attention-heads", "2", *TRAIN_FLAGS, "--max-tokens", "250",
             "--save-dir", save, "--disable-validation"]
    argv = [*flags, "--max-update", "2"]
    if layout.startswith("one generator"):
        shutil.copy(PER_TENSOR / "checkpoint_last.pt", save / "checkpoint_last.pt")
    else:  # today's run, its element-wise banks renamed as wd_fairseq wrote them before
        run_cli("fairseq-train", *flags, "--max-update", "1", "--teacher-path", postnorm_teacher)
        state = torch.load(save / "checkpoint_last.pt", weights_only=False)
        state["model"] = {k.replace("generator_banks.elementwise_0.", "generator_banks.elementwise."): v
                          for k, v in state["model"].items()}
        torch.save(state, save / "checkpoint_last.pt")
    refused = run_cli("fairseq-train", *argv, check=False)
    assert refused.returncode != 0
    assert re.search(rf"checkpoint_last\.pt: a phase-1 checkpoint of an older wd_fairseq \({layout}\).*"
                     r"Fix: resume with --reset-optimizer", refused.stderr + refused.stdout)
    run_cli("fairseq-train", *argv, "--reset-optimizer")
    state = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert any(key.startswith("generator_banks.") for key in state["model"])
    assert not any(".generator." in key and "generator_banks" not in key for key in state["model"])
    assert "generator_banks.elementwise_0.generator.scale" in state["model"]


def test_banks_read_the_teacher_laid_out_once_and_follow_its_changes(data_bin, postnorm_teacher):
    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, **STUDENT)
    model.train()
    stacked = [bank for bank in model.generator_banks.values()
               if isinstance(bank.generator, MatrixGenerator)]
    elementwise = model.generator_banks["elementwise_0"]
    student_logits(model, seed=0)
    inputs = {key: bank.teacher_input() for key, bank in model.generator_banks.items()}
    for bank in stacked:  # a view of the teacher itself: no copy per forward, none kept
        teacher = bank.teacher_tensors(0)[0]
        assert bank.teacher_input().untyped_storage().data_ptr() == teacher.untyped_storage().data_ptr()
        expected = torch.stack([t for group in bank.teacher_groups() for t in group])
        assert torch.equal(bank.teacher_input().reshape(expected.shape), expected)
    student_logits(model, seed=1)  # the next forward reuses every input, the tanh included
    assert all(bank.teacher_input() is inputs[key] for key, bank in model.generator_banks.items())
    with torch.no_grad():  # a teacher changed in place: its inputs are made again
        elementwise.teacher_tensors(0)[0].add_(1.0)
    assert elementwise.teacher_input() is not inputs["elementwise_0"]
    torch.testing.assert_close(elementwise.teacher_input(),
                               torch.tanh(torch.cat([g[0].reshape(-1) for g in elementwise.teacher_groups()])))
    storage = stacked[0].teacher_tensors(0)[0].untyped_storage().data_ptr()
    model.load_state_dict(model.state_dict())  # copied in place: the layout stays, not copied again
    assert stacked[0].teacher_tensors(0)[0].untyped_storage().data_ptr() == storage
    model.half()  # the teacher converted tensor by tensor is laid out again
    bank = stacked[0]
    assert bank.teacher_input().dtype == torch.float32
    assert all(t.dtype == torch.half and t.untyped_storage().data_ptr() == bank.teacher_tensors(0)[0]
               .untyped_storage().data_ptr() for group in bank.teacher_groups() for t in group)



def test_elementwise_banks_cut_by_size_generate_and_train_like_one(data_bin, postnorm_teacher, monkeypatch):
    import wd_fairseq.model as wd_model

    torch.manual_seed(0)
    one = build_wd(data_bin, postnorm_teacher, **STUDENT)
    monkeypatch.setattr(wd_model, "ELEMENTWISE_BANK_ELEMENTS", 1500)
    torch.manual_seed(0)
    cut = build_wd(data_bin, postnorm_teacher, **STUDENT)
    runs = [bank for key, bank in cut.generator_banks.items() if key.startswith("elementwise_")]
    assert len(runs) > 2 and sum(len(b.names) for b in runs) == len(one.generator_banks["elementwise_0"].names)
    assert all(b.generator.scale.numel() <= 1500 or len(b.names) == 1 for b in runs)
    for model in (one, cut):  # the same values away from A = 1, B = 0 in both
        model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and not name.startswith("generator_banks.elementwise_"):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
            for what in ("scale", "shift"):
                params = [getattr(bank.generator, what) for key, bank in model.generator_banks.items()
                          if key.startswith("elementwise_")]
                noise = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(7))
                for p, part in zip(params, noise.split([p.numel() for p in params])):
                    p.add_(part * 0.1)
    torch.manual_seed(3)
    a = student_logits(one)
    torch.manual_seed(3)
    b = student_logits(cut)
    assert torch.equal(a, b)
    a.square().sum().backward(), b.square().sum().backward()
    others = dict(cut.named_parameters())
    for name, p in one.named_parameters():
        if p.requires_grad and not name.startswith("generator_banks.elementwise_"):
            assert torch.equal(p.grad, others[name].grad), name
    flat = lambda m, what: torch.cat([getattr(b.generator, what).grad for k, b in m.generator_banks.items()  # noqa: E731
                                      if k.startswith("elementwise_")])
    for what in ("scale", "shift"):
        assert torch.equal(flat(one, what), flat(cut, what))


def test_a_one_elementwise_bank_checkpoint_loads_into_banks_cut_by_size(data_bin, postnorm_teacher, monkeypatch):
    import wd_fairseq.model as wd_model

    torch.manual_seed(0)
    model = build_wd(data_bin, postnorm_teacher, **STUDENT)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = dict(model.state_dict())
    old = {what: state.pop(f"generator_banks.elementwise_0.generator.{what}") for what in ("scale", "shift")}
    state.update({f"generator_banks.elementwise.generator.{what}": v for what, v in old.items()})
    monkeypatch.setattr(wd_model, "ELEMENTWISE_BANK_ELEMENTS", 1500)
    torch.manual_seed(1)
    cut = build_wd(data_bin, postnorm_teacher, **STUDENT)
    cut.upgrade_state_dict_named(state, "")
    cut.load_state_dict(state)
    model.eval(), cut.eval()
    for (module, name, _), (module_cut, _, _) in zip(model.generated_tensors(), cut.generated_tensors()):
        assert torch.equal(getattr(module, name), getattr(module_cut, name))
