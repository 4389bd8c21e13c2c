"""Reliability: bad input refused before any work (message names file, flag and fix; nothing
written), phase 1 killed mid-epoch and resumed, atomic wd-materialize, half precision with a
teacher whose weights overflow fp16 products."""

import copy
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, TRAIN_FLAGS, USER_DIR, build_wd, run_cli

import wd_fairseq  # noqa: F401  (allow-lists fairseq checkpoints for weights_only loading)
from wd_fairseq import materialize
from wd_fairseq.generator import MatrixGenerator
from wd_fairseq.teacher import WDSetupError, model_args

STUDENT_FLAGS = [
    "--encoder-layers", "2", "--decoder-layers", "1", "--decoder-embed-dim", "16",
    "--decoder-ffn-embed-dim", "24", "--decoder-attention-heads", "2",
]
#: Tiny models run faster, and use half the CPU, on one thread.
ENV = {"OMP_NUM_THREADS": "1"}
PHASE1_UPDATES = 12
#: Small batches (an epoch is ~40 updates) and a checkpoint every 4 updates: mid-epoch.
PHASE1_FLAGS = [
    *STUDENT_FLAGS, *TRAIN_FLAGS, "--max-tokens", "250", "--save-interval-updates", "4",
    "--disable-validation",
]


def subprocess_env(**extra) -> dict:
    """The environment run_cli gives its commands, plus ENV."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    return {**env, **ENV, **extra}


def phase1_args(data, teacher, save_dir, updates=PHASE1_UPDATES):
    return [data, "--user-dir", USER_DIR, "--arch", "wd_transformer", "--teacher-path", teacher,
            *PHASE1_FLAGS, "--max-update", updates, "--save-dir", save_dir]


def generator_params(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if ".generator." in k}


@pytest.fixture(scope="module")
def phase1_checkpoint(data_bin, postnorm_teacher, tmp_path_factory) -> Path:
    """An uninterrupted phase-1 run of PHASE1_UPDATES updates."""
    save_dir = tmp_path_factory.mktemp("phase1-uninterrupted")
    run_cli("fairseq-train", *phase1_args(data_bin, postnorm_teacher, save_dir), env=ENV)
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def language_model(data_bin, tmp_path_factory) -> Path:
    """A real fairseq transformer_lm checkpoint, trained 2 updates on the toy target text
    (the data-bin's binarised target side, linked as a language-modeling data-bin)."""
    work = tmp_path_factory.mktemp("lm")
    (work / "bin").mkdir()
    (work / "bin" / "dict.txt").symlink_to(data_bin / "dict.tgt.txt")
    for ext in ("bin", "idx"):
        (work / "bin" / f"train.{ext}").symlink_to(data_bin / f"train.src-tgt.tgt.{ext}")
    run_cli("fairseq-train", work / "bin", "--task", "language_modeling", "--arch", "transformer_lm",
            "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
            "--decoder-attention-heads", "2", "--tokens-per-sample", "32", "--optimizer", "adam",
            "--lr", "1e-3", "--max-tokens", "512", "--max-update", "2", "--seed", "1",
            "--save-dir", work / "ckpt", "--disable-validation", "--no-epoch-checkpoints",
            "--no-progress-bar", "--num-workers", "0", "--data-buffer-size", "0", env=ENV)
    return work / "ckpt" / "checkpoint_last.pt"


# -- bad input ---------------------------------------------------------------------------


def test_fairseq_train_refuses_a_corrupt_teacher_before_any_update(data_bin, tmp_path):
    """Through the real entry point: the message last, non-zero exit, nothing written."""
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(random.Random(0).randbytes(4096))
    save_dir = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", *phase1_args(data_bin, teacher, save_dir), env=ENV, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"wd_fairseq\.teacher\.WDSetupError: --teacher-path \S+teacher\.pt: cannot "
                        r"be read as a fairseq checkpoint \(UnpicklingError: (?!Weights only load)"
                        r"[^)]+\)\. Fix: .+", last), proc.stderr[-3000:]
    assert "num_updates" not in proc.stdout and "training on" not in proc.stdout
    assert not save_dir.exists() or not any(save_dir.iterdir())  # no checkpoint, no partial file


def test_a_language_model_is_refused_as_teacher(data_bin, language_model):
    """A real transformer_lm checkpoint (fairseq-train --task language_modeling)."""
    assert model_args(torch.load(language_model, weights_only=True))["_name"] == "transformer_lm"
    with pytest.raises(WDSetupError, match=r"--teacher-path \S+checkpoint_last\.pt: arch "
                       r"'transformer_lm' is not a fairseq translation Transformer .*Fix: "):
        build_wd(data_bin, language_model)


def test_a_bare_state_dict_is_refused_as_teacher(data_bin, postnorm_teacher, tmp_path):
    """torch.save(model.state_dict()): a torch file, but no model config to rebuild it from."""
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(postnorm_teacher, weights_only=True)["model"], bare)
    with pytest.raises(WDSetupError, match=r"bare\.pt: a torch file, but not a fairseq checkpoint "
                       r"\(no model config 'cfg' or 'args'; top-level keys: encoder\..*Fix: "):
        build_wd(data_bin, bare)


def without_root_privileges() -> list:
    """Command prefix under which permission bits apply: for root, drop the
    capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root: the read-only test needs setpriv (util-linux)"
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_wd_materialize_into_a_read_only_directory(phase1_checkpoint, tmp_path):
    """The console script: clear error, non-zero exit, no traceback, nothing written."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        proc = subprocess.run(
            [*without_root_privileges(), str(BIN / "wd-materialize"), str(phase1_checkpoint),
             str(readonly / "student.pt")], capture_output=True, text=True, env=subprocess_env())
    finally:
        readonly.chmod(0o755)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"wd-materialize: error: STUDENT \S+student\.pt: directory \S+readonly does "
                     r"not exist or is not writable\. Fix: ", proc.stderr), proc.stderr
    assert not any(readonly.iterdir())


def cli_error(argv) -> str:
    """Run wd-materialize in process; return its error message (it must exit non-zero)."""
    with pytest.raises(SystemExit) as exit_info:
        materialize.cli_main([str(a) for a in argv])
    assert exit_info.value.code not in (None, 0)
    return str(exit_info.value.code)


def test_wd_materialize_refuses_a_stock_checkpoint(postnorm_teacher, tmp_path):
    error = cli_error([postnorm_teacher, tmp_path / "student.pt"])
    assert re.fullmatch(r"wd-materialize: error: PHASE1 \S+: arch 'transformer' is not a WD "
                        r"phase-1 model\. Fix: .*--arch wd_transformer\*", error), error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("where,message", [
    ("missing/student.pt", r"\S+: directory \S+missing does not exist or is not writable\. Fix: "),
    ("a_file/student.pt", r"\S+: directory \S+a_file does not exist or is not writable\. Fix: "),
    ("a_dir", r"\S+a_dir: is a directory\. Fix: give a file name, e\.g\. \S+a_dir/student\.pt"),
], ids=["missing_directory", "parent_is_a_file", "is_a_directory"])
def test_wd_materialize_checks_the_output_before_any_work(where, message, tmp_path, monkeypatch):
    """Refused before the phase-1 checkpoint is even read."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    monkeypatch.setattr(materialize, "load_phase1", lambda *a: pytest.fail("loaded the phase-1 model"))
    error = cli_error([tmp_path / "phase1.pt", tmp_path / where])
    assert re.search(r"wd-materialize: error: STUDENT " + message, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
    assert not any((tmp_path / "a_dir").iterdir())


def failing_save(obj, f):
    """torch.save that writes part of the file, then hits a full disk."""
    f.write(b"PK\x03\x04 partial")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_wd_materialize_write_failure_leaves_no_partial_file(
        existing, phase1_checkpoint, tmp_path, monkeypatch):
    """Disk full mid-write: a clear error; the old STUDENT.pt (or none) and no temp file."""
    out = tmp_path / "student.pt"
    if existing:
        out.write_bytes(b"previous student")
    monkeypatch.setattr(materialize.torch, "save", failing_save)
    error = cli_error([phase1_checkpoint, out])
    assert re.search(r"not enough disk space for STUDENT \S+student\.pt \(the disk filled while "
                     r"writing: \[Errno 28\] No space left on device\): it needs about .*\. Fix: ",
                     error), error
    assert [p.name for p in tmp_path.iterdir()] == (["student.pt"] if existing else [])
    if existing:
        assert out.read_bytes() == b"previous student"


KILLED_WHILE_WRITING = """
import os, signal, sys
import torch
from wd_fairseq import materialize

def killed_save(obj, f):
    f.write(b"PK\\x03\\x04 partial")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed_save
materialize.cli_main(sys.argv[1:])
"""


def test_wd_materialize_killed_while_writing_leaves_no_partial_file(phase1_checkpoint, tmp_path):
    """SIGKILL mid-write: STUDENT.pt keeps its old content (only a hidden temp file remains)."""
    out = tmp_path / "student.pt"
    out.write_bytes(b"previous student")
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(phase1_checkpoint), str(out)],
                          capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert out.read_bytes() == b"previous student"  # the old file, untouched
    leftovers = [p.name for p in tmp_path.iterdir() if p != out]
    assert all(re.fullmatch(r"\.wd-materialize-\w+\.pt", name) for name in leftovers), leftovers


# -- interruption ---------------------------------------------------------------------


def test_phase1_killed_mid_epoch_resumes_to_the_uninterrupted_result(
        data_bin, postnorm_teacher, phase1_checkpoint, tmp_path):
    """SIGKILL right after the first mid-epoch checkpoint, then the same command again:
    bit-identical generator parameters (CPU, fixed seed, dropout on)."""
    save_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [str(BIN / "fairseq-train"), *map(str, phase1_args(data_bin, postnorm_teacher, save_dir))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=subprocess_env(PYTHONUNBUFFERED="1"),
    )
    log = []
    for line in proc.stdout:
        log.append(line)
        if re.search(r"Saved checkpoint \S+checkpoint_1_\d+\.pt", line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait() == -signal.SIGKILL, "".join(log[-30:])
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    updates = state["optimizer_history"][-1]["num_updates"]
    iterator = state["extra_state"]["train_iterator"]
    assert 4 <= updates < PHASE1_UPDATES and updates % 4 == 0
    assert iterator["epoch"] == 1 and iterator["iterations_in_epoch"] == updates  # mid-epoch

    resumed = run_cli("fairseq-train", *phase1_args(data_bin, postnorm_teacher, save_dir), env=ENV)
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ {updates} updates\)",
                     resumed.stdout + resumed.stderr)
    expected = generator_params(phase1_checkpoint)
    got = generator_params(save_dir / "checkpoint_last.pt")
    assert got.keys() == expected.keys() and expected
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    print(f"resumed after {updates} updates; max |generator diff| = {diff:.3g}")
    assert diff == 0.0


# -- clean exit -------------------------------------------------------------------------

PREFETCH_AT_EXIT = """
import sys, torch
from fairseq.data.iterators import EpochBatchIterator

class Dataset(torch.utils.data.Dataset):  # each batch: ~0.1 s inside torch (GIL released)
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return i
    def collater(self, items):
        a = torch.ones(1200, 1200)
        return (a @ a).sum()

itr = EpochBatchIterator(Dataset(), Dataset().collater, [[i] for i in range(4)],
                         buffer_size=int(sys.argv[1]))
next(iter(itr.next_epoch_itr(shuffle=False)))  # stop mid-epoch, as --max-update does
"""


def test_fairseq_prefetch_thread_aborts_the_exit_and_data_buffer_size_0_has_none():
    """Why every fairseq-train here passes --data-buffer-size 0: fairseq's prefetch thread
    (a daemon) keeps collating after the main thread stops; a Python 3.11 exit while it is
    inside torch aborts the process. With buffer size 0 there is no such thread."""
    def run(buffer_size):
        return subprocess.run([sys.executable, "-c", PREFETCH_AT_EXIT, str(buffer_size)],
                              capture_output=True, text=True, env=subprocess_env())

    prefetching = run(10)
    assert prefetching.returncode == -signal.SIGABRT, prefetching.stderr[-2000:]
    assert "terminate called without an active exception" in prefetching.stderr
    unbuffered = run(0)
    assert unbuffered.returncode == 0, unbuffered.stderr[-2000:]


# -- precision --------------------------------------------------------------------------


def scaled_teacher_model(data_bin, teacher):
    """A WD model whose teacher tensors (all but the untransformed output projection) have
    max |w| = 6e4: representable in fp16, but their products inside a generator are not."""
    torch.manual_seed(1)
    model = build_wd(data_bin, teacher, encoder_layers=2, decoder_layers=1, decoder_embed_dim=16,
                     decoder_ffn_embed_dim=24, decoder_attention_heads=2)
    with torch.no_grad():
        for name, p in model.teacher.named_parameters():
            if "output_projection" not in name and p.abs().max() > 0:
                p.mul_(6e4 / p.abs().max())
    return model.eval()


def fp16_generator_overflows(model) -> bool:
    """Would computing any full generator (docs/method.md 3.2) in fp16 overflow?"""
    for bank in model.generator_banks.values():
        g = bank.generator
        if isinstance(g, MatrixGenerator):
            for k in range(len(bank.names)):
                c = (g.layer_mix[k].half() @ g.layer_reduce[k].half()).squeeze(1)
                w = sum(ci * t.half() for ci, t in zip(c, bank.teacher_tensors(k)))
                if not torch.isfinite(g.out_proj[k].half().t() @ w @ g.in_proj[k].half()).all():
                    return True
    return False


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)],
                         ids=["float16", "bfloat16"])
def test_half_model_with_a_large_teacher_is_finite_and_matches_fp32(
        dtype, atol, data_bin, postnorm_teacher):
    """The half model is finite, its generated tensors are the fp32 generators' output cast
    once, and its logits are close to an fp32 model with the same (rounded) parameters.
    (The unrounded fp32 model differs more: rounding weights this large to half shifts
    some tanh inputs by more than tanh's linear range.)"""
    low = scaled_teacher_model(data_bin, postnorm_teacher).to(dtype)
    assert dtype is torch.bfloat16 or fp16_generator_overflows(low)
    # fp32 reference with the very same (rounded) parameters.
    reference = copy.deepcopy(low).float()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(low.encoder.dictionary), (3, 6), generator=g)
    prev = torch.randint(4, len(low.decoder.dictionary), (3, 5), generator=g)
    with torch.no_grad():
        out = low(src, torch.full((3,), 6), prev)[0]
        expected = reference(src, torch.full((3,), 6), prev)[0]
        generated, generated_fp32 = low.student_state_dict(), reference.student_state_dict()
    for key, value in generated_fp32.items():  # fp32 generator maths, cast once
        assert torch.equal(generated[key], value.to(dtype)), key
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=atol)
