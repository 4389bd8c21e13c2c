"""The GPU check's scripts, exercised on the CPU so that they cannot rot: the whole
check as a dry run (toy sizes, fp32), and fp16_smoke.sh's refusals and its handling of
a training process that aborts at exit."""

import json
import os
import subprocess
import sys
import tarfile

from conftest import REPO, tool


def smoke_env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (PATH: conftest.cli_zygote's)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env | extra


def run_smoke(work, env):
    return subprocess.run(["bash", str(REPO / "examples" / "fp16_smoke.sh"), str(work)],
                          capture_output=True, text=True, env=env)


def test_gpu_check_dry_run_runs_every_part_through_the_same_scripts(tmp_path):
    empty_wheelhouse = tmp_path / "wheels"
    empty_wheelhouse.mkdir()
    out = tmp_path / "out"
    env = smoke_env(
        GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_VENV=str(tmp_path / "venv"),
        GPU_CHECK_WORK=str(tmp_path / "work"),
        GPU_CHECK_ARGS="--dry-run --teacher-updates 4 --phase1-updates 2")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out),
                           str(empty_wheelhouse)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The check ran the repository's code from the layered environment it made.
    assert (tmp_path / "venv" / "bin" / "wd-materialize").exists()
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["dry_run"] and all(parts[p]["ok"] for p in
                                     ("environment", "smoke", "phase1", "decoding", "kd_data")), parts
    assert parts["environment"]["cuda_available"] is False
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
