"""End to end through the real entry points: stock teacher -> WD phase 1 (--user-dir)
-> wd-materialize -> stock decoding and stock phase 2, without the plugin."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN_FLAGS, USER_DIR, run_cli, translation_task
from fairseq import checkpoint_utils

STUDENT_FLAGS = [
    "--encoder-layers", "2", "--decoder-layers", "1", "--decoder-embed-dim", "16",
    "--decoder-ffn-embed-dim", "24", "--decoder-attention-heads", "2",
]


def phase1(data, teacher, save_dir, *extra, updates=16, check=True):
    return run_cli(
        "fairseq-train", data, "--user-dir", USER_DIR, "--arch", "wd_transformer",
        "--teacher-path", teacher, *STUDENT_FLAGS, *TRAIN_FLAGS,
        "--max-update", updates, "--save-dir", save_dir, *extra, check=check,
    )


def hypotheses(generate_output: str):
    return sorted(line.split("\t")[2] for line in generate_output.splitlines() if line.startswith("H-"))


def generate(data, path, *extra):
    proc = run_cli("fairseq-generate", data, "--path", path, "--beam", "3", "--batch-size", "16",
                   "--gen-subset", "test", "--required-batch-size-multiple", "1", *extra)
    hyps = hypotheses(proc.stdout)
    assert len(hyps) == 60  # every test sentence (fairseq drops none with batch multiple 1)
    return hyps


def decoder_outputs(path, data):
    """Log-probs of a fixed batch (fp32, eval mode), loaded as fairseq loads checkpoints."""
    import wd_fairseq  # noqa: F401  (phase-1 checkpoints need the plugin)

    task = translation_task(data)
    overrides = {"data": str(data)}
    [model], _ = checkpoint_utils.load_model_ensemble([str(path)], arg_overrides=overrides, task=task)
    model.eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(task.source_dictionary), (4, 7), generator=g)
    prev = torch.randint(4, len(task.target_dictionary), (4, 6), generator=g)
    with torch.no_grad():
        out = model(src, torch.full((4,), 7), prev)
        return model.get_normalized_probs(out, log_probs=True)


_RUNS = {}


def wd_run(kind, request, tmp_path_factory):
    """A phase-1 run and its materialised student, made once per kind of teacher."""
    if kind not in _RUNS:
        data = request.getfixturevalue("joined_data_bin" if kind == "shared" else "data_bin")
        teacher = request.getfixturevalue(f"{kind}_teacher")
        work = tmp_path_factory.mktemp(f"wd-{kind}")
        extra = {"prenorm": ["--share-decoder-input-output-embed"],
                 "shared": ["--share-all-embeddings", "--decoder-embed-dim", "32",
                            "--decoder-attention-heads", "4"]}.get(kind, [])
        phase1(data, teacher, work / "phase1", *extra)
        out = run_cli("wd-materialize", work / "phase1" / "checkpoint_last.pt", work / "student.pt")
        _RUNS[kind] = dict(kind=kind, data=data, phase1=work / "phase1" / "checkpoint_last.pt",
                           student=work / "student.pt", materialize_stdout=out.stdout)
    return _RUNS[kind]


@pytest.fixture(params=["postnorm", "prenorm", "shared"])
def run(request, tmp_path_factory):
    return wd_run(request.param, request, tmp_path_factory)


@pytest.fixture
def prenorm_run(request, tmp_path_factory):
    return wd_run("prenorm", request, tmp_path_factory)


@pytest.fixture
def shared_run(request, tmp_path_factory):
    return wd_run("shared", request, tmp_path_factory)


def test_materialised_student_has_the_phase1_outputs(run):
    wd = decoder_outputs(run["phase1"], run["data"])
    stock = decoder_outputs(run["student"], run["data"])
    assert (wd - stock).abs().max().item() <= 1e-5


def test_stock_decoding_gives_the_phase1_hypotheses(run):
    with_plugin = generate(run["data"], run["phase1"], "--user-dir", USER_DIR)
    without_plugin = generate(run["data"], run["student"])
    assert with_plugin == without_plugin


def test_student_checkpoint_loads_with_an_empty_allow_list(run):
    """Plain data only: loads with weights_only and no allow-list (no plugin, no env var)."""
    code = (
        "import sys, torch\n"
        "torch.serialization.clear_safe_globals()\n"
        "state = torch.load(sys.argv[1], weights_only=True)\n"
        "assert state['cfg']['model']['arch'] == 'transformer', state['cfg']['model']\n"
        "assert state['cfg']['common']['user_dir'] is None\n"
        "assert not any('parametrizations' in k or k.startswith('teacher.') for k in state['model'])\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code, str(run["student"])], check=True)


def test_stock_interactive_decodes_the_student(shared_run, raw_corpus):
    run = shared_run
    lines = (raw_corpus / "test.src").read_text().splitlines()[:5]
    proc = subprocess.run(
        [str(sys.executable).replace("python", "fairseq-interactive"), str(run["data"]),
         "--path", str(run["student"]), "--source-lang", "src", "--target-lang", "tgt", "--beam", "2"],
        input="\n".join(lines) + "\n", capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(hypotheses(proc.stdout)) == 5


def test_phase2_from_the_printed_flags_is_stock_fairseq(prenorm_run, tmp_path):
    """The phase-2 command wd-materialize prints is complete: run as printed (DATA and
    SAVE_DIR filled in, fewer updates), stock fairseq-train fine-tunes the student (the
    pre-norm, tied-embedding one) with phase 1's training flags; stock fairseq-generate
    decodes its checkpoint: no --user-dir, no env var."""
    run = prenorm_run
    line = next(l for l in run["materialize_stdout"].splitlines() if l.startswith("phase 2"))
    places = {"DATA": str(run["data"]), "SAVE_DIR": str(tmp_path / "phase2")}
    command = [places.get(a, a) for a in shlex.split(line.split("fairseq-train", 1)[1])]
    assert "--share-decoder-input-output-embed" in command and "--decoder-normalize-before" in command
    for flag, value in (("--upsample-primary", "1"), ("--data-buffer-size", "0"), ("--lr", "0.005"),
                        ("--lr-scheduler", "inverse_sqrt"), ("--warmup-updates", "20"),
                        ("--criterion", "label_smoothed_cross_entropy"), ("--max-tokens", "2000")):
        assert command[command.index(flag) + 1] == value, flag  # phase 1's own training flags
    assert "--update-offset 16 " in run["materialize_stdout"]  # how to continue phase 1's curve
    proc = run_cli("fairseq-train", *command, "--max-update", 6, "--no-progress-bar")
    assert re.search(r"loaded checkpoint .*student\.pt", proc.stdout + proc.stderr, re.I)
    generate(run["data"], tmp_path / "phase2" / "checkpoint_last.pt")
    state = torch.load(tmp_path / "phase2" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"].arch == "transformer"


def test_phase1_checkpoint_is_self_contained(data_bin, postnorm_teacher, tmp_path):
    """Resume, materialise and decode after the teacher file has been moved away."""
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(postnorm_teacher.read_bytes())
    phase1(data_bin, teacher, tmp_path / "phase1", updates=8)
    teacher.unlink()
    resumed = phase1(data_bin, teacher, tmp_path / "phase1", updates=12)
    log = resumed.stdout + resumed.stderr
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 8 updates\)", log)
    assert "num_updates 12" in log
    run_cli("wd-materialize", tmp_path / "phase1" / "checkpoint_last.pt", tmp_path / "student.pt")
    generate(data_bin, tmp_path / "phase1" / "checkpoint_last.pt", "--user-dir", USER_DIR)


def test_phase1_resumed_with_another_teacher_stops_before_training(data_bin, postnorm_teacher,
                                                                   tmp_path):
    """A resumed run keeps its teacher: other weights, or other weights and architecture
    options, are refused naming both files and the fix; the same teacher, moved, resumes."""
    first = tmp_path / "first.pt"
    first.write_bytes(postnorm_teacher.read_bytes())
    save_dir = tmp_path / "phase1"
    phase1(data_bin, first, save_dir, updates=8)
    checkpoint = save_dir / "checkpoint_last.pt"
    saved = checkpoint.read_bytes()
    state = torch.load(first, weights_only=True)
    state["model"]["encoder.layers.0.fc1.weight"] += 0.01
    torch.save(state, tmp_path / "weights.pt")
    state["cfg"]["model"].activation_fn = "gelu"
    torch.save(state, tmp_path / "weights-gelu.pt")
    for name, differs in [("weights", rf"1 of \d+ weight tensors"),
                          ("weights-gelu", r"1 of \d+ weight tensors and architecture options "
                                           r"\(activation_fn relu -> gelu\)")]:
        new = tmp_path / f"{name}.pt"
        proc = phase1(data_bin, new, save_dir, updates=12, check=False)
        assert proc.returncode != 0, f"resumed with {new}"
        last = proc.stderr.strip().splitlines()[-1]
        print(last)
        assert re.fullmatch(
            rf"wd_fairseq\.teacher\.WDSetupError: --teacher-path {new}: this run resumes from "
            rf"{checkpoint}, whose teacher \({first}\) differs from it in {differs}; its "
            rf"generators were trained on that teacher\. Fix: resume with that same teacher "
            rf"\(--teacher-path {first}\), or pass a new --save-dir to start a new run with {new}",
            last), proc.stderr[-3000:]
        assert "num_updates" not in proc.stdout + proc.stderr
        assert checkpoint.read_bytes() == saved
    moved = tmp_path / "moved.pt"
    first.rename(moved)
    resumed = phase1(data_bin, moved, save_dir, updates=12)
    assert "num_updates 12" in resumed.stdout + resumed.stderr


def test_hydra_train_with_common_user_dir(data_bin, postnorm_teacher, tmp_path):
    (tmp_path / "wd.yaml").write_text(f"""
common: {{user_dir: {USER_DIR}, seed: 1, no_progress_bar: true}}
task: {{_name: translation, data: {data_bin}, source_lang: src, target_lang: tgt}}
model: {{_name: wd_transformer_stu1, teacher_path: {postnorm_teacher}, decoder_embed_dim: 16,
         decoder_ffn_embed_dim: 24, decoder_attention_heads: 2}}
criterion: {{_name: label_smoothed_cross_entropy, label_smoothing: 0.1}}
optimizer: {{_name: adam}}
lr_scheduler: {{_name: inverse_sqrt, warmup_updates: 4}}
optimization: {{lr: [0.005], max_update: 4}}
dataset: {{max_tokens: 2000, num_workers: 0}}
checkpoint: {{save_dir: {tmp_path / "ckpt"}, no_epoch_checkpoints: true}}
""")
    run_cli("fairseq-hydra-train", "--config-dir", tmp_path, "--config-name", "wd", cwd=tmp_path)
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    model = state["cfg"]["model"]
    assert (model["_name"], model["decoder_layers"], model["decoder_embed_dim"]) == ("wd_transformer_stu1", 1, 16)
    assert state["optimizer_history"][-1]["num_updates"] == 4


def editable_venv(root):
    """A new virtual environment with this checkout installed by ``pip install -e .``
    (offline: its dependencies are this environment's, linked in, without wd_fairseq)."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    deps = root / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        if not (entry.name.startswith(("wd_fairseq", "__editable__")) or entry.suffix == ".pth"):
            (deps / entry.name).symlink_to(entry)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    new_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (new_site / "zz_dependencies.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-build-isolation", "-e", REPO], check=True, capture_output=True)
    return python, new_site


def test_editable_install_lets_stock_generate_load_fairseq_checkpoints(postnorm_teacher, data_bin,
                                                                        tmp_path):
    """`pip install -e .` installs the start-up hook too: stock fairseq-generate (no
    --user-dir) loads a stock fairseq checkpoint (it holds an argparse.Namespace) under
    torch >= 2.6; without the hook the same command is refused."""
    python, site = editable_venv(tmp_path)
    hook = site / "wd_fairseq.pth"
    assert str(REPO / "wd_fairseq") in hook.read_text()  # loads from the checkout
    command = [python, "-m", "fairseq_cli.generate", data_bin, "--path", postnorm_teacher,
               "--beam", "1", "--gen-subset", "test", "--required-batch-size-multiple", "1"]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(hypotheses(proc.stdout)) == 60
    hook.unlink()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "argparse.Namespace" in proc.stderr


def logged_rates(proc) -> dict:
    """{update: lr} of a fairseq-train run with --log-format json --log-interval 1."""
    rates = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if "| train_inner |" in line:
            stats = json.loads(line.split("| train_inner |", 1)[1])
            rates[int(stats["num_updates"])] = float(stats["lr"])
    return rates


def test_offset_schedule_continues_the_single_run_curve(data_bin, tmp_path):
    """A second run with --lr-scheduler inverse_sqrt_offset --update-offset 6 logs, at its
    update s, the rate a single inverse_sqrt run logs at update 6 + s (across the end of
    the warmup, which is 8 updates); stock fairseq-generate decodes its checkpoint."""
    from conftest import TEACHER_SHAPE

    schedule = ["--lr", "5e-3", "--warmup-updates", "8", "--warmup-init-lr", "1e-7",
                "--log-format", "json", "--log-interval", "1", "--disable-validation"]
    single = run_cli("fairseq-train", data_bin, "--arch", "transformer", *TEACHER_SHAPE, *TRAIN_FLAGS,
                     *schedule, "--max-update", 14, "--save-dir", tmp_path / "single")
    second = run_cli("fairseq-train", data_bin, "--arch", "transformer", *TEACHER_SHAPE, *TRAIN_FLAGS,
                     *schedule, "--user-dir", USER_DIR, "--lr-scheduler", "inverse_sqrt_offset",
                     "--update-offset", 6, "--max-update", 8, "--save-dir", tmp_path / "second")
    single, second = logged_rates(single), logged_rates(second)
    assert sorted(second) == list(range(1, 9)) and sorted(single) == list(range(1, 15))
    for step, rate in second.items():
        assert rate == pytest.approx(single[6 + step], rel=1e-5), step
    assert second[1] < second[2] > second[8]  # the end of the warmup, then the decay: no restart
    generate(data_bin, tmp_path / "second" / "checkpoint_last.pt")  # stock fairseq, no plugin
