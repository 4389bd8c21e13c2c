"""wd-init-student: a stock student selected from the teacher's weights (layers, heads,
rows and columns), written as a stock checkpoint that stock fairseq trains."""

import subprocess
import sys

import pytest
import torch
from conftest import TRAIN_FLAGS, build_wd, run_cli, translation_task

from wd_fairseq.init_student import init_student, select
from wd_fairseq.teacher import WDSetupError


def load_stock(path, data):
    """The student as stock fairseq builds it from the checkpoint alone."""
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(path)], arg_overrides={"data": str(data)})
    return models[0].eval()


def outputs(model, data):
    dictionary = translation_task(data).source_dictionary
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(dictionary), (3, 7), generator=g)
    prev = torch.randint(4, len(dictionary), (3, 5), generator=g)
    with torch.no_grad():
        return model(src, torch.full((3,), 7), prev)[0]


def test_select_first_last_and_evenly_spaced_ending_with_the_last():
    assert select(6, 2, "first") == [0, 1] and select(6, 2, "last") == [4, 5]
    assert select(6, 2, "spread") == [2, 5] and select(6, 3, "spread") == [1, 3, 5]
    assert select(3, 2, "spread") == [0, 2] and select(6, 1, "spread") == [5]
    assert select(6, 6, "spread") == list(range(6))


def test_a_student_of_the_teachers_shape_is_the_teacher(data_bin, postnorm_teacher, tmp_path):
    init_student(str(postnorm_teacher), str(tmp_path / "student.pt"), {})
    student, teacher = (load_stock(p, data_bin) for p in (tmp_path / "student.pt", postnorm_teacher))
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    torch.testing.assert_close(outputs(student, data_bin), outputs(teacher, data_bin),
                               rtol=0, atol=0)


@pytest.mark.parametrize("layers,mapped", [("first", [0, 1]), ("last", [1, 2]), ("spread", [0, 2])])
def test_selected_tensors_are_exactly_the_teachers_slices(data_bin, postnorm_teacher, tmp_path,
                                                         layers, mapped):
    """Teacher 3+3 x 32/64/4 heads of 8; student: encoder 2 layers (uneven 3 -> 2), decoder
    2 x 16/32 with 4 heads of 4 (half of each teacher head, as the authors' stu1)."""
    flags = dict(encoder_layers=2, decoder_layers=2, decoder_embed_dim=16,
                 decoder_ffn_embed_dim=32, decoder_attention_heads=4)
    init_student(str(postnorm_teacher), str(tmp_path / "s.pt"), flags, layers=layers, dims="spread")
    student = load_stock(tmp_path / "s.pt", data_bin).state_dict()
    teacher = torch.load(postnorm_teacher, weights_only=False)["model"]
    width = [1 + 2 * i for i in range(16)]  # spread: 16 of 32, ending with the last
    ffn = [1 + 2 * i for i in range(32)]
    heads = [h * 8 + j for h in range(4) for j in (1, 3, 5, 7)]  # every head, 4 of its 8
    t, s = f"decoder.layers.{mapped[1]}.", "decoder.layers.1."
    checks = {
        s + "self_attn.q_proj.weight": teacher[t + "self_attn.q_proj.weight"][heads][:, width],
        s + "self_attn.v_proj.bias": teacher[t + "self_attn.v_proj.bias"][heads],
        s + "self_attn.out_proj.weight": teacher[t + "self_attn.out_proj.weight"][width][:, heads],
        # keys and values of the encoder-attention read the (full-width) encoder output
        s + "encoder_attn.k_proj.weight": teacher[t + "encoder_attn.k_proj.weight"][heads],
        s + "fc1.weight": teacher[t + "fc1.weight"][ffn][:, width],
        s + "fc2.weight": teacher[t + "fc2.weight"][width][:, ffn],
        s + "final_layer_norm.weight": teacher[t + "final_layer_norm.weight"][width],
        "encoder.layers.1.fc1.weight": teacher[f"encoder.layers.{mapped[1]}.fc1.weight"],
        "encoder.layers.0.fc1.weight": teacher[f"encoder.layers.{mapped[0]}.fc1.weight"],
        "decoder.embed_tokens.weight": teacher["decoder.embed_tokens.weight"][:, width],
        "decoder.output_projection.weight": teacher["decoder.output_projection.weight"][:, width],
        "encoder.embed_tokens.weight": teacher["encoder.embed_tokens.weight"],
    }
    for key, expected in checks.items():
        assert torch.equal(student[key], expected), key


def test_shared_tables_stay_shared(joined_data_bin, shared_teacher, tmp_path):
    flags = dict(encoder_embed_dim=16, decoder_embed_dim=16, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32)
    init_student(str(shared_teacher), str(tmp_path / "s.pt"), flags)
    student = load_stock(tmp_path / "s.pt", joined_data_bin)
    assert student.encoder.embed_tokens is student.decoder.embed_tokens
    assert student.decoder.output_projection.weight is student.decoder.embed_tokens.weight
    teacher = torch.load(shared_teacher, weights_only=False)["model"]
    assert torch.equal(student.encoder.embed_tokens.weight,
                       teacher["encoder.embed_tokens.weight"][:, :16])


@pytest.mark.parametrize("flags,message", [
    (dict(decoder_embed_dim=64), "--decoder-embed-dim 64: a selected student needs between 1 and "
                                 "the teacher's 32"),
    (dict(decoder_layers=4), "--decoder-layers 4: a selected student needs between 1 and the "
                             "teacher's 3"),
    (dict(decoder_embed_dim=32, decoder_attention_heads=2),
     "at most the teacher's head width 8. Fix: use at least 4 heads that divide 32"),
    (dict(encoder_embed_dim=16, encoder_attention_heads=3),
     "student heads must divide the width"),
])
def test_impossible_shapes_are_refused_before_writing(data_bin, postnorm_teacher, tmp_path,
                                                      flags, message):
    with pytest.raises(WDSetupError, match="Fix:") as error:
        init_student(str(postnorm_teacher), str(tmp_path / "s.pt"), flags)
    assert message in str(error.value)
    assert not list(tmp_path.iterdir())


def test_sharing_teacher_with_a_narrower_student_decoder_ties_the_decoders_tables(
        joined_data_bin, shared_teacher, tmp_path):
    """One table cannot have two widths: the student keeps the teacher's table (encoder)
    and its first 16 columns (decoder, tied with the output projection), as phase 1's
    --share-decoder-input-output-embed student of the same shape."""
    flags, _ = init_student(str(shared_teacher), str(tmp_path / "s.pt"),
                         dict(decoder_embed_dim=16, decoder_attention_heads=2))
    assert "--share-decoder-input-output-embed" in flags and "--share-all-embeddings" not in flags
    student = load_stock(tmp_path / "s.pt", joined_data_bin)
    assert student.decoder.output_projection.weight is student.decoder.embed_tokens.weight
    table = torch.load(shared_teacher, weights_only=False)["model"]["encoder.embed_tokens.weight"]
    assert torch.equal(student.encoder.embed_tokens.weight, table)
    assert torch.equal(student.decoder.embed_tokens.weight, table[:, :16])


def test_cli_student_loads_without_the_plugin_and_trains_with_stock_fairseq(
        data_bin, postnorm_teacher, tmp_path):
    student = tmp_path / "student.pt"
    proc = run_cli("wd-init-student", postnorm_teacher, student, "--decoder-layers", "1",
                   "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
                   "--decoder-attention-heads", "4")
    flags = proc.stdout.split("fairseq-train DATA ", 1)[1].split(" --finetune-from-model")[0]
    # Only tensors and plain containers: plain torch loads it, no fairseq, no allow-list.
    subprocess.run([sys.executable, "-c", "import sys, torch; "
                    "torch.load(sys.argv[1], weights_only=True)", str(student)], check=True)
    run_cli("fairseq-train", data_bin, *flags.split(), *TRAIN_FLAGS, "--max-update", "3",
            "--finetune-from-model", student, "--save-dir", tmp_path / "ft",
            "--disable-validation")
    assert (tmp_path / "ft" / "checkpoint_last.pt").exists()
    # A preset too big for this teacher is refused with the flag it sets.
    refused = run_cli("wd-init-student", postnorm_teacher, tmp_path / "x.pt", "--arch",
                      "wd_transformer_stu1", check=False)
    assert refused.returncode != 0 and "--decoder-embed-dim 256" in refused.stderr


def test_wd_start_is_phase_one_at_step_zero_materialised(data_bin, postnorm_teacher, tmp_path, one_thread):
    """--init wd-slice: the student phase 1 with --wd-init slice starts from (the control
    "slice start + KD, no generator"): equal to the in-process phase-1 model's generated
    tensors, the teacher's own where the shapes are equal; --init wd-faithful differs."""
    shape = {"decoder_layers": 1, "decoder_embed_dim": 16, "decoder_ffn_embed_dim": 32,
             "decoder_attention_heads": 4}
    flags = [part for name, value in shape.items() for part in ("--" + name.replace("_", "-"), value)]
    written = {}
    for init in ("wd-slice", "wd-faithful"):
        proc = run_cli("wd-init-student", postnorm_teacher, tmp_path / f"{init}.pt", "--init", init, *flags)
        assert "--finetune-from-model" in proc.stdout
        written[init] = torch.load(tmp_path / f"{init}.pt", weights_only=True)["model"]
    model = build_wd(data_bin, postnorm_teacher, wd_init="slice", **shape).float().eval()
    with torch.no_grad():
        expected = model.student_state_dict()
    assert expected.keys() == written["wd-slice"].keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written["wd-slice"][name], tensor.float(), rtol=0, atol=0)
    teacher = torch.load(postnorm_teacher, weights_only=True)["model"]
    torch.testing.assert_close(written["wd-slice"]["encoder.layers.1.fc1.weight"],
                               teacher["encoder.layers.1.fc1.weight"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(written["wd-faithful"]["decoder.layers.0.fc1.weight"],
                           written["wd-slice"]["decoder.layers.0.fc1.weight"])
