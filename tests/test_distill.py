"""wd-distill: from a stock teacher (trained here with plain fairseq-train, conftest) and
its data-bin to a scored, exported student; resume after a kill; the refusals of plan."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import BIN, run_cli
from wd_fairseq.distill import cli_main

#: Tiny sizes: 8 updates (WD: 4 + 4), a student decoder of 1 x 16, at most 12 tokens decoded.
TINY = ["--updates", "8", "--phase1-updates", "4", "--decoder-layers", "1", "--decoder-embed-dim", "16",
        "--decoder-ffn-embed-dim", "32", "--cpu", "--max-tokens", "2000", "--max-len-a", "0",
        "--max-len-b", "12"]


def distill(command, teacher, data, work, *extra, check=True):
    return run_cli("wd-distill", command, "--teacher-path", teacher, "--data", data, "--work", work,
                   *TINY, *extra, check=check)


@pytest.fixture(scope="module")
def wd_run(postnorm_teacher, data_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("distill") / "wd"
    plan = distill("plan", postnorm_teacher, data_bin, work)
    run = distill("run", postnorm_teacher, data_bin, work)
    return work, plan, run


def student_weights(work):
    return torch.load(work / "export" / "student.pt", weights_only=True)["model"]


def test_run_scores_and_exports_a_stock_student(wd_run, data_bin, tmp_path):
    work, plan, run = wd_run
    assert "wd-slice (--method auto for 8 updates: WD slice below 3,200)" in plan.stdout
    assert "[1/7] kd_data: to run" in plan.stdout and "[7/7] card: to run" in plan.stdout
    card = json.loads((work / "results.json").read_text())
    assert card["method"] == "wd-slice" and card["directions"] == ["src-tgt"]
    for record in card["scores"]["src-tgt"].values():
        assert 0 <= record["sacrebleu"] <= 100 and record["sacrebleu_signature"].startswith("nrefs:1")
    assert card["speedup_vs_teacher"]["src-tgt"] > 0
    assert len((work / "eval" / "references.src-tgt.txt").read_text().splitlines()) == 60
    assert "| src-tgt | student |" in run.stdout and "wd-materialize" in (work / "results.md").read_text()
    assert (work / "results.png").stat().st_size > 5_000  # (the test extras install matplotlib)
    # phase 2 continued phase 1's learning-rate curve (one curve over the 8 updates)
    phase2 = (work / "logs" / "wd_phase2.log").read_text()
    assert "inverse_sqrt_offset" in phase2 and "'update_offset': 4" in phase2
    # the export is stock: fairseq-generate decodes it without the plugin
    state = torch.load(work / "export" / "student.pt", weights_only=True)
    assert state["cfg"]["common"]["user_dir"] is None and state["last_optimizer_state"] is None
    assert state["cfg"]["model"]["arch"] == "transformer"
    generated = run_cli("fairseq-generate", data_bin, "--path", work / "export" / "student.pt", "--gen-subset",
                        "test", "--beam", "2", "--max-len-b", "5", "--cpu", "--required-batch-size-multiple", "1")
    assert "Translated 60 sentences" in generated.stdout + generated.stderr
    assert (work / "export" / "ct2-int8" / "model.bin").is_file()
    # the user's data-bin is never written: the KD split lives in WORK/data-bin-kd
    assert not list(data_bin.glob("train1.*")) and list((work / "data-bin-kd").glob("train1.*"))


def test_a_second_run_keeps_every_stage(wd_run, postnorm_teacher, data_bin):
    work, _, _ = wd_run
    before = (work / "results.json").stat().st_mtime_ns
    proc = distill("run", postnorm_teacher, data_bin, work)
    assert proc.stdout.count("done earlier, kept") == 7
    assert (work / "results.json").stat().st_mtime_ns == before


def kill_after_a_save(proc, log):
    """SIGKILL ``proc``'s process group at a moment its fairseq-train (logging to ``log``)
    has saved and is not saving: after a "Saved checkpoint" line (fairseq logs it once
    checkpoint_last.pt is written) and before any later save began."""
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None and time.time() < deadline, "the run ended before phase 2 saved"
        text = log.read_text() if log.exists() else ""
        if "Saved checkpoint" in text:
            os.killpg(proc.pid, signal.SIGSTOP)
            after = log.read_text().rsplit("Saved checkpoint", 1)[1].split("\n", 1)[-1]
            if "checkpoint" not in after:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)


def test_killed_mid_stage_resumes_to_the_same_student(wd_run, postnorm_teacher, data_bin, tmp_path):
    """Killed in phase 2 just after its save at update 2, rerun: earlier stages are kept,
    phase 2 resumes from its last save, and the student is the uninterrupted run's."""
    work = tmp_path / "wd"
    command = [str(BIN / "wd-distill"), "run", "--teacher-path", str(postnorm_teacher), "--data",
               str(data_bin), "--work", str(work), *TINY]
    # real processes throughout: SIGSTOP and SIGKILL of the group must reach fairseq-train itself
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WD_TESTS_SUBPROCESS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    kill_after_a_save(proc, work / "logs" / "wd_phase2.log")
    assert not (work / "done" / "wd_phase2").exists()
    resumed = distill("run", postnorm_teacher, data_bin, work)
    assert resumed.stdout.count("done earlier, kept") == 3  # kd_data, wd_phase1, materialize
    assert "wd_phase2: resuming" in resumed.stdout
    log = (work / "logs" / "wd_phase2.log").read_text()
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ [1-3] updates\)",
                     log.split("$ fairseq-train")[-1])
    for name, tensor in student_weights(wd_run[0]).items():
        assert torch.equal(tensor, student_weights(work)[name]), name


def test_selection_kd_and_changed_settings_rerun_what_they_change(wd_run, postnorm_teacher, data_bin):
    """selection-kd in the same work directory: the KD data is kept (same teacher, data,
    decoding), training and everything after it run for the new method."""
    work, _, _ = wd_run
    proc = distill("run", postnorm_teacher, data_bin, work, "--method", "selection-kd")
    assert proc.stdout.count("done earlier, kept") == 1  # kd_data
    card = json.loads((work / "results.json").read_text())
    assert card["method"] == "selection-kd" and card["chosen_by"] == "--method"
    log = (work / "logs" / "train.log").read_text()
    assert "$ wd-init-student" in log and "--finetune-from-model" in log


def test_plan_refuses_before_any_work(wd_run, postnorm_teacher, prenorm_teacher, data_bin,
                                     joined_data_bin, tmp_path):
    """Through the console script once (a dictionary of other symbols), in-process for
    the rest (the console script's exit: ``wd-distill: error: MESSAGE``): nothing is written."""
    work = tmp_path / "work"
    proc = distill("plan", postnorm_teacher, joined_data_bin, work, check=False)
    assert proc.returncode == 1 and "vocabulary has" in proc.stderr and "Fix:" in proc.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    for teacher, directory, extra, message in [
            (postnorm_teacher, work, ["--decoder-embed-dim", "48"], "--decoder-embed-dim 48: a selected student"),
            (postnorm_teacher, work, ["--test-split", "blind"], "no split 'blind'"),
            (postnorm_teacher, work, ["--decoder-layers", "3", "--decoder-embed-dim", "32",
                                      "--decoder-ffn-embed-dim", "64"], "the teacher's shape: nothing to distil"),
            (postnorm_teacher, work, ["--method", "wd", "--phase1-updates", "8"], "leaves no update"),
            (postnorm_teacher, other, [], "holds other files"),
            (prenorm_teacher, wd_run[0], [], f"holds the run of teacher {postnorm_teacher}")]:
        with pytest.raises(SystemExit) as stop:
            cli_main(["plan", "--teacher-path", str(teacher), "--data", str(data_bin), "--work",
                      str(directory), *TINY, *extra])
        assert message in str(stop.value.code), (message, stop.value.code)  # (sys.exit(MESSAGE))
    assert not work.exists() and os.listdir(other) == ["notes.txt"]


def test_raw_text_is_binarised_as_the_teachers_data(postnorm_teacher, raw_corpus, data_bin, tmp_path):
    """--raw-dir with BPE codes (learnt here with enough merges that every toy word is one
    token): the prepare stage writes the very data-bin the teacher was trained on; the
    run goes on from there (--until kd_data stops after the KD data)."""
    codes = tmp_path / "codes"
    both = (raw_corpus / "train.src").read_text() + (raw_corpus / "train.tgt").read_text()
    learnt = subprocess.run([str(BIN / "subword-nmt"), "learn-bpe", "-s", "300"], input=both,
                            capture_output=True, text=True, check=True)
    codes.write_text(learnt.stdout)
    work = tmp_path / "raw"
    proc = run_cli("wd-distill", "run", "--teacher-path", postnorm_teacher, "--raw-dir", raw_corpus,
                   "--bpe-codes", codes, "--tokenizer", "none", "--work", work, *TINY, "--until", "kd_data")
    assert "[1/8] prepare" in proc.stdout and "stopped after kd_data (--until)" in proc.stdout
    for name in ("train.src-tgt.src.bin", "train.src-tgt.tgt.bin", "test.src-tgt.tgt.bin", "dict.tgt.txt"):
        assert (work / "data-bin" / name).read_bytes() == (data_bin / name).read_bytes(), name
    assert list((work / "data-bin-kd").glob("train1.src-tgt.*")) and not (work / "done" / "wd_phase1").exists()
    plan = run_cli("wd-distill", "plan", "--teacher-path", postnorm_teacher, "--raw-dir", raw_corpus,
                   "--bpe-codes", codes, "--tokenizer", "none", "--work", work, *TINY)
    assert "[1/8] prepare: done" in plan.stdout and f"--refs {raw_corpus}/test.tgt" in plan.stdout


def test_probe_estimates_every_stage_that_decodes_or_trains(postnorm_teacher, data_bin, tmp_path):
    proc = distill("plan", postnorm_teacher, data_bin, tmp_path / "work", "--probe")
    for stage in ("kd_data", "wd_phase1", "wd_phase2", "evaluate"):
        assert re.search(rf"\] {stage}: to run \(estimate: \d+m\d\ds\)", proc.stdout), stage
    assert "estimates from a probe: 64 sentences decoded, 6 updates" in proc.stdout
    assert os.listdir(tmp_path) == []  # the probe's scratch directory is gone, nothing else written


def test_phase2_continues_phase1s_curve_or_restarts_it(postnorm_teacher, data_bin, tmp_path, capsys):
    """The plan's phase 2: by default inverse_sqrt_offset from update --phase1-updates with
    the run's warmup; --phase2-schedule restart: plain inverse_sqrt, a new warmup of a quarter
    of phase 2 (at most the authors' 1,000), given once."""
    import shlex

    flags = {}
    for schedule in ("continue", "restart"):
        cli_main(["plan", "--teacher-path", str(postnorm_teacher), "--data", str(data_bin), "--work",
                  str(tmp_path / schedule), *TINY, "--updates", "80", "--phase1-updates", "40",
                  "--phase2-schedule", schedule])
        [line] = [line for line in capsys.readouterr().out.splitlines()
                  if "fairseq-train" in line and "--finetune-from-model" in line]
        args = shlex.split(line)
        assert args.count("--warmup-updates") == args.count("--lr-scheduler") == 1
        flags[schedule] = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert (flags["continue"]["--lr-scheduler"], flags["continue"]["--update-offset"]) == ("inverse_sqrt_offset", "40")
    assert flags["continue"]["--warmup-updates"] == "5"  # --updates 80 / 16
    assert flags["restart"]["--lr-scheduler"] == "inverse_sqrt" and "--update-offset" not in flags["restart"]
    assert flags["restart"]["--warmup-updates"] == "10"  # 40 phase-2 updates / 4
