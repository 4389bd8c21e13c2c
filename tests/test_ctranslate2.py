"""wd-export-ct2: a materialised WD student as a CTranslate2 model.

A tiny stu1-like student (one decoder layer, narrower than the encoder, so the
decoder's encoder-attention reads keys/values of another width) goes through phase 1
from the tiny post-norm teacher, ``wd-materialize`` and ``wd-export-ct2``; its
CTranslate2 output is compared with ``fairseq-generate --beam 1`` and with fairseq's
own float32 log-probabilities of those hypotheses.

What a quantized export may change is bounded, not its tokens: int8 GEMM kernels
differ between CPUs (oneDNN without AVX-512 VNNI sums u8*s8 pairs with int16
saturation), and greedy search turns any logit change at a near-tie into another
sentence. So the int8 and float16 exports are judged by

* the stored weights, decoded with CTranslate2's float32 kernels (``compute_type=
  "float32"`` dequantizes on load; the same numbers on every x86-64 CPU): fairseq's
  greedy hypotheses keep their per-token log-probabilities within a tolerance, and
  greedy output may leave fairseq's only at decisions whose float32 margin is small;
* the native int8 kernels: the model runs ``int8_float32`` and stays within a loose
  log-probability tolerance that every x86-64 int8 path meets.

Measured (student below, 200 phase-1 updates): stored int8 weights change a token's
log-probability by 0.010 nats on average (max 0.09) on every backend; native int8 by
0.013 with oneDNN on AVX-512 VNNI and by 0.22 (max 1.2) with oneDNN limited to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``: 16-21 of 60 greedy outputs equal fairseq's). Exports with
deliberately wrong weights (one decoder FFN matrix row-flipped, the output projection
scaled by 0.7, an encoder attention projection transposed) change it by 0.096 to 0.47
on average, so the stored-weight tolerance (0.04) separates them from a correct export.
"""

import math

import ctranslate2
import pytest
import torch
from fairseq import checkpoint_utils

from conftest import TRAIN_FLAGS, USER_DIR, run_cli
from wd_fairseq.export_ctranslate2 import cli_main

STUDENT = ["--decoder-layers", "1", "--decoder-embed-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "4"]
#: Phase-1 updates: enough that most greedy decisions have clear margins.
STUDENT_UPDATES = 200
MAX_LEN = 20  # fairseq --max-len-b and CTranslate2 max_decoding_length (EOS not counted)


@pytest.fixture(scope="module")
def phase1(data_bin, postnorm_teacher, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("ct2-phase1")
    run_cli(
        "fairseq-train", data_bin, "--user-dir", USER_DIR, "--arch", "wd_transformer",
        "--teacher-path", postnorm_teacher, *STUDENT, *TRAIN_FLAGS,
        "--max-update", STUDENT_UPDATES,
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


@pytest.fixture(scope="module")
def fairseq_scores(student, reference):
    """{sentence id: (log-probabilities, margins)} of each token of the reference
    hypothesis plus EOS under the fairseq student in float32, teacher-forced. A margin
    is the chosen token's log-probability minus the best other one's, among the tokens
    fairseq's greedy search could pick there (never <pad>, no EOS first, EOS forced at
    MAX_LEN)."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(student)])
    model, src_dict, tgt_dict = models[0].eval(), task.source_dictionary, task.target_dictionary
    scores = {}
    with torch.no_grad():
        for i, (source, hypothesis) in reference.items():
            src = torch.tensor([[src_dict.index(w) for w in source] + [src_dict.eos()]])
            tgt = [tgt_dict.index(w) for w in hypothesis] + [tgt_dict.eos()]
            prev = torch.tensor([[tgt_dict.eos()] + tgt[:-1]])
            out = model(src, torch.tensor([src.size(1)]), prev)
            lprobs = model.get_normalized_probs(out, log_probs=True)[0].float()
            lprobs[:, tgt_dict.pad()] = -math.inf
            lprobs[0, tgt_dict.eos()] = -math.inf  # fairseq's min_len=1
            steps = torch.arange(len(tgt))
            chosen = lprobs[steps, tgt]
            others = lprobs.clone()
            others[steps, tgt] = -math.inf
            margins = (chosen - others.max(-1).values).tolist()
            if len(hypothesis) == MAX_LEN:
                margins[-1] = math.inf  # EOS is forced there
            scores[i] = (chosen.tolist(), margins)
    return scores


def ct2_greedy(translator, reference):
    """CTranslate2 greedy hypotheses of the reference's sources, in id order."""
    results = translator.translate_batch(
        [source for source, _ in reference.values()], beam_size=1,
        max_decoding_length=MAX_LEN, suppress_sequences=[["<blank>"]],  # fairseq never emits <pad>
    )
    return [r.hypotheses[0] for r in results]


def assert_close_to_fairseq(translator, reference, fairseq_scores, mean_tol, max_tol,
                            tie_margin):
    """The translator scores fairseq's hypotheses within ``mean_tol``/``max_tol`` nats
    per token of fairseq's float32 log-probabilities, and its greedy output leaves
    fairseq's only at a decision whose fairseq margin is below ``tie_margin``.
    Returns the number of sentences identical to fairseq's."""
    sources = [source for source, _ in reference.values()]
    scored = translator.score_batch(sources, [h for _, h in reference.values()])
    errors = []
    for i, result in zip(reference, scored):
        assert len(result.log_probs) == len(fairseq_scores[i][0]), f"sentence {i}"
        errors += [abs(a - b) for a, b in zip(result.log_probs, fairseq_scores[i][0])]
    mean_error = sum(errors) / len(errors)
    assert mean_error <= mean_tol and max(errors) <= max_tol, (mean_error, max(errors))

    same, unexplained = 0, []
    for (i, (_, expected)), output in zip(reference.items(), ct2_greedy(translator, reference)):
        if output == expected:
            same += 1
            continue
        a, b = output + ["</s>"], expected + ["</s>"]
        step = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
        margin = fairseq_scores[i][1][step]
        if margin >= tie_margin:
            unexplained.append((i, step, round(margin, 4)))
    assert not unexplained, f"left fairseq's greedy path at clear decisions: {unexplained}"
    return same


def test_float32_export_matches_fairseq_greedy(reference, exports, fairseq_scores):
    translator = ctranslate2.Translator(str(exports["float32"]))
    # Only an exact tie (below float32 summation-order noise) may resolve differently.
    same = assert_close_to_fairseq(translator, reference, fairseq_scores, 1e-4, 1e-3, 1e-3)
    assert same >= len(reference) - 1
    assert sum(len(h) > 2 for _, h in reference.values()) > 30  # not a degenerate student
    margins = [m for _, ms in fairseq_scores.values() for m in ms]
    assert sum(m >= 0.6 for m in margins) >= 0.4 * len(margins)  # decisions with clear margins


def test_int8_export_stores_int8_weights_close_to_float32(reference, exports, fairseq_scores):
    size = {q: (exports[q] / "model.bin").stat().st_size for q in ("int8", "float32")}
    assert size["int8"] < 0.8 * size["float32"]  # int8 matrices; embeddings, biases, norms float
    # Dequantized to float32 on load: what the export wrote, decoded the same on every CPU.
    translator = ctranslate2.Translator(str(exports["int8"]), compute_type="float32")
    # A flip at a decision needs the two candidates to move apart by its margin.
    assert_close_to_fairseq(translator, reference, fairseq_scores, 0.04, 0.3, 2 * 0.3)


def test_int8_export_runs_int8_kernels(reference, exports, fairseq_scores):
    translator = ctranslate2.Translator(str(exports["int8"]))
    assert translator.compute_type == "int8_float32"
    # int8 kernels differ by CPU (see the module docstring): a loose bound that every
    # x86-64 path meets and a broken model does not (uniform guessing: 3.5 nats/token).
    assert_close_to_fairseq(translator, reference, fairseq_scores, 0.5, 2.5, math.inf)


def test_float16_export_stores_half_and_stays_close(reference, exports, fairseq_scores):
    size = {q: (exports[q] / "model.bin").stat().st_size for q in ("float16", "float32")}
    assert size["float16"] < 0.55 * size["float32"]
    translator = ctranslate2.Translator(str(exports["float16"]), compute_type="float32")
    assert_close_to_fairseq(translator, reference, fairseq_scores, 0.005, 0.03, 2 * 0.03)


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
