"""wd-export-ct2: a materialised WD student as a CTranslate2 model.

A tiny stu1-like student (one decoder layer, narrower than the encoder, so the
decoder's encoder-attention reads keys/values of another width) goes through phase 1
from the tiny post-norm teacher, ``wd-materialize`` and ``wd-export-ct2``; its greedy
output is compared token by token with ``fairseq-generate --beam 1``.
"""

import ctranslate2
import pytest
import torch

from conftest import TRAIN_FLAGS, USER_DIR, run_cli
from wd_fairseq.export_ctranslate2 import cli_main

STUDENT = ["--decoder-layers", "1", "--decoder-embed-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "4"]
MAX_LEN = 20  # fairseq --max-len-b and CTranslate2 max_decoding_length (EOS not counted)


@pytest.fixture(scope="module")
def phase1(data_bin, postnorm_teacher, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("ct2-phase1")
    run_cli(
        "fairseq-train", data_bin, "--user-dir", USER_DIR, "--arch", "wd_transformer",
        "--teacher-path", postnorm_teacher, *STUDENT, *TRAIN_FLAGS, "--max-update", "30",
        "--save-dir", save_dir, "--disable-validation", "--no-save-optimizer-state",
    )
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def student(phase1):
    path = phase1.parent / "student.pt"
    run_cli("wd-materialize", phase1, path)
    return path


@pytest.fixture(scope="module")
def reference(data_bin, student):
    """{sentence id: (source tokens, hypothesis tokens)} from fairseq-generate --beam 1."""
    out = run_cli(
        "fairseq-generate", data_bin, "--path", student, "--gen-subset", "test",
        "--beam", "1", "--batch-size", "16", "--max-len-a", "0", "--max-len-b", MAX_LEN,
        "--required-batch-size-multiple", "1",  # else fairseq-fixed drops a tail batch
    ).stdout
    sources, hypotheses = {}, {}
    for line in out.splitlines():
        fields = line.split("\t")
        if line.startswith("S-"):
            sources[int(fields[0][2:])] = fields[1].split()
        elif line.startswith("H-"):
            hypotheses[int(fields[0][2:])] = fields[2].split()
    assert len(sources) == 60 and sources.keys() == hypotheses.keys()
    return {i: (sources[i], hypotheses[i]) for i in sorted(sources)}


@pytest.fixture(scope="module")
def exports(student, tmp_path_factory):
    """{quantization: CTranslate2 model directory} written by the wd-export-ct2 CLI."""
    root = tmp_path_factory.mktemp("ct2-exports")
    for quantization in ("float32", "int8", "float16"):
        run_cli("wd-export-ct2", student, root / quantization, "--quantization", quantization)
    return {q: root / q for q in ("float32", "int8", "float16")}


def ct2_greedy(translator, reference):
    """CTranslate2 greedy hypotheses of the reference's sources, in id order."""
    results = translator.translate_batch(
        [source for source, _ in reference.values()], beam_size=1,
        max_decoding_length=MAX_LEN, suppress_sequences=[["<blank>"]],  # fairseq never emits <pad>
    )
    return [r.hypotheses[0] for r in results]


def test_float32_export_matches_fairseq_greedy(reference, exports):
    outputs = ct2_greedy(ctranslate2.Translator(str(exports["float32"])), reference)
    for (i, (_, expected)), output in zip(reference.items(), outputs):
        assert output == expected, f"sentence {i}"
    assert sum(len(h) > 2 for _, h in reference.values()) > 30  # not a degenerate student


def test_int8_export_runs_int8_and_stays_close(reference, exports):
    translator = ctranslate2.Translator(str(exports["int8"]))
    assert translator.compute_type == "int8_float32"
    _assert_close(ct2_greedy(translator, reference), reference)


def test_float16_export_stores_half_and_stays_close(reference, exports):
    size = {q: (exports[q] / "model.bin").stat().st_size for q in ("float16", "float32")}
    assert size["float16"] < 0.55 * size["float32"]  # run as float32 on this CPU
    _assert_close(ct2_greedy(ctranslate2.Translator(str(exports["float16"])), reference), reference)


def _assert_close(outputs, reference):
    same = sum(output == expected for (_, expected), output in zip(reference.values(), outputs))
    assert same >= 0.8 * len(reference), f"{same}/{len(reference)} sentences as fairseq's"


def _error(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in argv])
    return str(exc.value.code)


def test_refuses_unequal_attention_heads(data_bin, student, tmp_path):
    state = torch.load(student, map_location="cpu", weights_only=True)
    state["cfg"]["model"]["decoder_attention_heads"] = 2  # same tensor shapes
    path = tmp_path / "two-heads.pt"
    torch.save(state, path)
    message = _error([path, tmp_path / "out", "--data", data_bin])
    assert "4 encoder and 2 decoder attention heads" in message
    assert "--decoder-attention-heads 4" in message
    assert not (tmp_path / "out").exists()


def test_refuses_phase1_checkpoint(data_bin, phase1, tmp_path):
    message = _error([phase1, tmp_path / "out", "--data", data_bin])
    assert "wd-materialize" in message


def test_existing_output_needs_force(data_bin, student, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert "--force" in _error([student, out, "--data", data_bin, "--quantization", "float32"])
    assert (out / "keep").exists()
    cli_main([str(student), str(out), "--data", str(data_bin), "--quantization", "float32",
              "--force"])
    assert (out / "model.bin").exists() and not (out / "keep").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".wd-export-ct2-")]
