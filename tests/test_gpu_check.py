"""The GPU check's scripts, exercised on the CPU so that they cannot rot: gpu_check.sh's
layered environment, every part of gpu_check.py as a dry run (toy sizes, fp32), and
fp16_smoke.sh's refusals and its handling of a training process that aborts at exit."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
from cli_zygote import Zygote
from conftest import REPO, tool


def smoke_env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (PATH: conftest.cli_zygote's)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env | extra


def run_smoke(work, env):
    return subprocess.run(["bash", str(REPO / "examples" / "fp16_smoke.sh"), str(work)],
                          capture_output=True, text=True, env=env)


def test_gpu_check_sh_installs_the_checkout_into_an_environment_layered_over_the_machines(tmp_path):
    """gpu_check.sh's part: a venv over the machine's Python (its torch reused), this checkout
    installed as users install it, then gpu_check.py from that venv (its cheapest part here)."""
    empty_wheelhouse = tmp_path / "wheels"
    empty_wheelhouse.mkdir()
    out, venv = tmp_path / "out", tmp_path / "venv"
    env = smoke_env(GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_VENV=str(venv),
                    GPU_CHECK_WORK=str(tmp_path / "work"),
                    GPU_CHECK_ARGS="--dry-run --parts environment")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out),
                           str(empty_wheelhouse)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (venv / "bin" / "wd-materialize").exists()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import torch, wd_fairseq; print(wd_fairseq.__file__); print(torch.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(venv)) and not where[1].startswith(str(venv))
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and list(report["parts"]) == ["environment"]
    assert report["parts"]["environment"]["ok"] and report["parts"]["environment"]["cuda_available"] is False


@pytest.fixture
def benchmarks_zygote():
    """A zygote started with the thread settings the benchmarks give their commands, so that
    it serves those too (the session's has no MKL_NUM_THREADS)."""
    if os.environ.get("WD_TESTS_SUBPROCESS") == "1":
        yield {}
        return
    zygote = Zygote(smoke_env(MKL_NUM_THREADS="1"))
    yield {"WD_TESTS_ZYGOTE": zygote.socket}
    zygote.close()


def test_gpu_check_dry_run_runs_every_part_through_the_same_scripts(tmp_path, benchmarks_zygote):
    """gpu_check.py --dry-run: every part, each through the scripts it runs on a GPU (the
    stand-in python: they and their commands fork from a zygote)."""
    out = tmp_path / "out"
    proc = subprocess.run([tool("python"), str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--out", str(out), "--work", str(tmp_path / "work"),
                           "--teacher-updates", "4", "--phase1-updates", "2"], capture_output=True,
                          text=True, env=smoke_env(MKL_NUM_THREADS="1", **benchmarks_zygote))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["dry_run"] and all(parts[p]["ok"] for p in
                                     ("environment", "smoke", "phase1", "decoding", "kd_data")), parts
    teacher, phase1 = parts["smoke"]["fp32"]["runs"]
    assert (teacher["updates"], phase1["updates"]) == (4, 2)
    assert parts["smoke"]["assets"]["ok"]
    assert set(parts["phase1"]["summary"]) == {
        f"{student} at {tokens} tokens" for student in ("stu1", "stu2") for tokens in (512, 1024)}
    batches = {row["max_tokens"]: row["target_tokens"]
               for row in parts["phase1"]["results"]["rows"]}
    assert batches[512] < batches[1024] <= 1024  # each size really gets its own batch
    rows = json.loads((out / "decoding_speed_valid.json").read_text())["rows"]
    assert {(r["model"], r["engine"]) for r in rows} >= {
        ("teacher", "fairseq"), ("stu1", "fairseq"), ("stu2", "fairseq")}
    assert all(r["tokens"] == rows[0]["tokens"] for r in rows)
    kd_rows = json.loads((out / "kd_data_speed.json").read_text())["rows"]
    assert [r["engine"] for r in kd_rows] == ["fairseq", "ctranslate2:float32", "ctranslate2:int8"]
    assert all(r["sentences"] == 48 and r["sentences_per_second"] > 0 for r in kd_rows)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/smoke-fp32-phase1.log" in names and "logs/phase1_update.log" in names


def test_fp16_smoke_without_a_gpu_says_so_and_does_nothing(tmp_path):
    work = tmp_path / "smoke"
    proc = run_smoke(work, smoke_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2, proc.stderr
    assert "fp16_smoke.sh: no CUDA GPU is visible to torch" in proc.stderr
    assert "run it on a GPU machine. Nothing was run." in proc.stderr
    assert not work.exists()


def test_fp16_smoke_refuses_bf16_which_fairseq_runs_on_tpus_only(tmp_path):
    proc = run_smoke(tmp_path / "smoke", smoke_env(FP16_SMOKE_PRECISION="bf16"))
    assert proc.returncode == 1
    assert "--bf16 sets --tpu" in proc.stderr and "Fix: use fp16 or amp" in proc.stderr
    assert not (tmp_path / "smoke").exists()


def test_fp16_smoke_goes_on_after_an_abort_at_exit_and_fails_at_the_end(tmp_path):
    """A fairseq-train that finishes, saves, then aborts at exit (as --fp16 teachers did
    on an H200 with torch 2.11): later stages still run; the script ends with status 3."""
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "fairseq-train").write_text(
        f'#!/usr/bin/env bash\n"{tool("fairseq-train")}" "$@" || exit $?\n'
        'echo "terminate called without an active exception" >&2\nkill -ABRT $$\n')
    (stand_in / "fairseq-train").chmod(0o755)
    env = smoke_env(FP16_SMOKE_CPU="1", FP16_SMOKE_TEACHER_UPDATES="3",
                    FP16_SMOKE_PHASE1_UPDATES="2")
    env["PATH"] = f"{stand_in}:{env['PATH']}"
    work = tmp_path / "smoke"
    proc = run_smoke(work, env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "WARNING: teacher aborted at process exit" in proc.stderr
    assert "terminate called without an active exception" in proc.stderr
    assert "these processes aborted at exit: teacher phase1" in proc.stderr
    updates = [json.loads(line)["updates"] for line in proc.stdout.splitlines()
               if line.startswith("{")]
    assert updates == [3, 2] and (work / "student.pt").exists()


def test_fp16_smoke_still_fails_on_an_abort_before_training_finished(tmp_path):
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "fairseq-train").write_text("#!/usr/bin/env bash\nkill -ABRT $$\n")
    (stand_in / "fairseq-train").chmod(0o755)
    env = smoke_env(FP16_SMOKE_CPU="1")
    env["PATH"] = f"{stand_in}:{env['PATH']}"
    proc = run_smoke(tmp_path / "smoke", env)
    assert proc.returncode == 1
    assert "stage 'teacher' failed" in proc.stderr
