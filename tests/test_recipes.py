"""The recipe machinery: examples/recipes/pipeline.sh driven through a pair's run.sh on a
tiny local corpus (every stage but the download, the same flags, tiny sizes, CPU; paths
with spaces and raw text with \\r, \\x85, \\u2028 and form feeds inside lines), the
download/checksum path on a local archive, and wd-evaluate's scoring conventions."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, write_toy_corpus

sys.path.insert(0, str(REPO / "examples" / "recipes"))
import recipe_tools  # noqa: E402

import wd_fairseq  # noqa: F401
from wd_fairseq import evaluation  # noqa: E402
from wd_fairseq.evaluation import (  # noqa: E402
    EvaluationError,
    read_generate_log,
    read_lines,
    results_table,
    score,
)
from wd_fairseq.checkpoints import phase2_flags  # noqa: E402

STAGES = ["prepare", "teacher", "kd_data", "kd_student", "wd_phase1", "materialize",
          "wd_phase2", "evaluate", "speed"]
MODELS = ["teacher", "kd_student", "wd_phase1", "wd_student"]

#: Tiny stand-ins for the real sizes; everything else is the pair script's.
TINY = dict(
    CPU="1", FP16="0", NUM_GPUS="1", MAX_TOKENS="1000", UPDATE_FREQ="1", BATCH_TOKENS="1000",
    WORKERS="1", BPE_MERGES="30",
    BPE_VOCAB_THRESHOLD="1", TEACHER_LAYERS="2", TEACHER_DIM="32", TEACHER_FFN="64",
    TEACHER_HEADS="4", STUDENT_DEC_LAYERS="1", STUDENT_DEC_DIM="16", STUDENT_DEC_FFN="32",
    STUDENT_DEC_HEADS="4", LR="5e-3", WARMUP="20", PHASE2_WARMUP="5", TEACHER_UPDATES="20",
    KD_UPDATES="10", PHASE1_UPDATES="10", PHASE2_UPDATES="10", SAVE_INTERVAL_UPDATES="5",
    AVG_LAST="2", KD_ALPHA="0.5", KD_TEMPERATURE="2", KD_MAX_TOKENS="2000",
    EVAL_BATCH_SIZE="64", SPEED_BATCH_SIZE="32", SPEED_ROUNDS="2", GENERATE_EXTRA="--max-len-a 0 --max-len-b 20",
    TRAIN_EXTRA="--validate-interval 100", KD_EXTRA="--filter-length-ratio 50",
)


def run_recipe(script, *args, env, check=True):
    full = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    # (conftest.cli_zygote put this environment's scripts, behind their stand-ins, first on PATH)
    full["PYTHON"] = "python"  # (this environment's, or its stand-in: conftest.cli_zygote)
    full["OMP_NUM_THREADS"] = "1"  # tiny models on shared cores: threads only add overhead
    full.update(env)
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True,
                          env=full)  # (REPO / an absolute path) is that path
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def raw_en_ro(directory: Path, n_train: int) -> Path:
    write_toy_corpus(directory, n_train=n_train)
    for path in list(directory.iterdir()):
        lang = {"src": "en", "tgt": "ro"}[path.suffix[1:]]
        path.rename(path.with_suffix(f".{lang}"))
    return directory


#: Characters that end a line for Python's str.splitlines (and, \\r, for its default
#: text mode) but not for the recipes: raw WMT text holds them inside lines.
INLINE_BREAKS = ["\r", "\x85", "\u2028", "\x0c", "\u2029"]


def add_inline_breaks(raw: Path) -> None:
    """Put a line-break-like character inside some lines (in place of a space), on one
    side only, and drop the final newline of one file: line counts must not change."""
    for name in ("train.en", "train.ro", "test.ro", "valid.en"):
        lines = (raw / name).read_text(encoding="utf-8").split("\n")[:-1]
        for i, char in zip(range(3, len(lines), 7), INLINE_BREAKS * 2):
            lines[i] = lines[i].replace(" ", char, 1)
        end = "" if name == "train.ro" else "\n"
        (raw / name).write_bytes(("\n".join(lines) + end).encode("utf-8"))


def copy_of_the_repo(directory: Path) -> Path:
    """The recipes and the plugin, as a user's clone at ``directory`` has them."""
    for part in ("examples", "wd_fairseq"):
        shutil.copytree(REPO / part, directory / part,
                        ignore=shutil.ignore_patterns("__pycache__", "corpus", "benchmark"))
    return directory


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """One full tiny run of examples/wmt16_en_ro/run.sh on local text (RAW_DIR), from a
    clone and into a work directory whose paths contain spaces, on raw text with \\r etc."""
    base = tmp_path_factory.mktemp("recipe run")
    raw = raw_en_ro(base / "raw en-ro", n_train=300)
    add_inline_breaks(raw)
    repo = copy_of_the_repo(base / "my clone")
    work = base / "work dir"
    env = dict(TINY, RAW_DIR=str(raw), WORK=str(work))
    proc = run_recipe(repo / "examples/wmt16_en_ro/run.sh", env=env)
    return work, env, proc


def test_full_pipeline_runs_every_stage(recipe_run):
    work, _, proc = recipe_run
    for stage in STAGES:
        assert (work / "done" / stage).exists(), stage
        assert (work / "logs" / f"{stage}.log").stat().st_size > 0, stage
        assert f"done {stage}" in proc.stdout
    # KD data: in data-bin-kd only; the teacher's data-bin stays original
    assert not list((work / "data-bin").glob("train1.*"))
    assert (work / "data-bin-kd" / "train1.en-ro.ro.bin").is_file()
    assert os.path.realpath(work / "data-bin-kd" / "valid.en-ro.ro.bin") == \
        str(work / "data-bin" / "valid.en-ro.ro.bin")
    # wd-kd-data's default engine, with the extra flags of KD_EXTRA
    kd = json.loads((work / "data-bin-kd" / "kd-train1" / "summary.json").read_text())
    assert (kd["engine"], kd["manifest"]["quantization"]) == ("ctranslate2", "int8")
    assert kd["manifest"]["filters"]["max_length_ratio"] == 50
    for stage in ("kd_student", "wd_phase1", "wd_phase2"):
        log = (work / "logs" / f"{stage}.log").read_text()
        assert "train1 en-ro 300 examples" in log, stage  # original + KD data
        assert "'valid_subset': 'valid'" in log
    # word-level KD (KD_ALPHA=0.5): the KD baseline's teacher from --teacher-path, phase 1's
    # from inside the model; phase 2 is label-smoothed CE only (the authors')
    assert "kd_loss" in (work / "logs" / "kd_student.log").read_text()
    assert "kd_loss" in (work / "logs" / "wd_phase1.log").read_text()
    assert "kd_loss" not in (work / "logs" / "wd_phase2.log").read_text()
    assert "--arch transformer" in (work / "wd_phase2" / "flags").read_text()


def test_raw_text_with_inline_line_breaks_keeps_its_lines(recipe_run):
    """\\r, \\x85, \\u2028, form feeds inside lines and a missing final newline
    (add_inline_breaks): every set keeps its line count, in every file the recipe writes."""
    work = recipe_run[0]
    counts = {"train": 300, "valid": 60, "test": 60}
    for name, n in counts.items():
        for lang in ("en", "ro"):
            assert (work / "tok" / f"{name}.{lang}").read_bytes().count(b"\n") == n
            text = (work / "bpe" / f"{name}.{lang}").read_text(encoding="utf-8")
            assert len(text.splitlines()) == n, (name, lang)  # nothing left that splits
    assert "en-ro 300 examples" in (work / "logs" / "teacher.log").read_text()


def test_every_training_stage_logs_its_batch_and_trains_with_the_dropout(recipe_run):
    work = recipe_run[0]
    for stage in ("teacher", "kd_student", "wd_phase1", "wd_phase2"):
        log = (work / "logs" / f"{stage}.log").read_text()
        assert ("batch: 1 GPU process(es) x 1000 tokens x update-freq 1 = 1000 tokens per "
                "update (target BATCH_TOKENS=1000)") in log, stage
        # fairseq's resolved config: dropout 0.1 for attention and activation too
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            assert re.search(rf"(?<![a-z_]){name}'?(: |=)0\.1\b", log), (stage, name)
        assert "'distributed_world_size': 1" in log, stage
        assert "'data_buffer_size': 0" in log, stage  # no prefetch thread to abort the exit
    flags = (work / "wd_phase2" / "flags").read_text().split()
    for flag in ("--dropout", "--attention-dropout", "--activation-dropout"):
        assert flags[flags.index(flag) + 1] == "0.1"  # phase 2 rebuilds the student's dropout


def test_averages_follow_their_rules_and_only_what_they_need_is_kept(recipe_run):
    """Teacher: the last AVG_LAST=2 epoch checkpoints (the authors' rule); students: the
    last 2 saves. Phase 1 keeps no epoch checkpoints, the teacher one interval save."""
    work = recipe_run[0]

    def epoch_saves(directory):
        return sorted(directory.glob("checkpoint[0-9]*.pt"), key=lambda p: int(p.stem[10:]))

    def average_of(paths, key="decoder.layers.0.fc1.weight"):
        states = [torch.load(p, weights_only=True)["model"][key] for p in paths]
        return sum(states) / len(states)

    teacher = epoch_saves(work / "teacher")
    assert len(teacher) == 2  # --keep-last-epochs 2
    assert len(list((work / "teacher").glob("checkpoint_*_*.pt"))) <= 1
    avg = torch.load(work / "teacher" / "checkpoint_avg.pt", weights_only=True)["model"]
    assert torch.allclose(avg["decoder.layers.0.fc1.weight"], average_of(teacher))
    saves = [p for p in (work / "kd_student").glob("checkpoint*.pt")
             if p.stem not in ("checkpoint_last", "checkpoint_best", "checkpoint_avg")]
    last = sorted(saves, key=lambda p: p.stat().st_mtime_ns)[-2:]
    updates = [torch.load(p, weights_only=True)["optimizer_history"][-1]["num_updates"]
               for p in last]
    assert updates[0] < updates[1] == 10
    avg = torch.load(work / "kd_student" / "checkpoint_avg.pt", weights_only=True)["model"]
    assert torch.allclose(avg["decoder.layers.0.fc1.weight"], average_of(last))
    assert not epoch_saves(work / "wd_phase1")
    assert len(list((work / "wd_phase1").glob("checkpoint_*_*.pt"))) <= 1
    notes = json.loads((work / "results.json").read_text())["notes"]
    assert "teacher: average of the last 2 epoch checkpoints" in notes
    assert "kd_student: average of the last 2 saves, 5 updates apart" in notes
    assert "wd_student: average of the last 2 saves, 5 updates apart" in notes
    assert "- teacher: average of the last 2 epoch checkpoints" in (work / "results.md").read_text()


def test_stage_logs_show_progress_not_library_noise(recipe_run):
    """No tensorboardX hint, no hydra deprecation warnings, no hydra DEBUG lines, no tqdm
    bars (subword-nmt's) in any stage's log (wd_fairseq/quiet_logs.py, TQDM_DISABLE); the
    progress and results are still there."""
    work = recipe_run[0]
    for stage in STAGES:
        log = (work / "logs" / f"{stage}.log").read_text()
        for noise in ("tensorboardX", "UserWarning", "deprecat", "DEBUG:hydra", "it/s]"):
            assert noise not in log, (stage, noise)
    assert "num_updates" in (work / "logs" / "teacher.log").read_text()


def test_results_table(recipe_run):
    work = recipe_run[0]
    results = json.loads((work / "results.json").read_text())
    assert [row["model"] for row in results["rows"]] == MODELS
    for row in results["rows"]:
        assert row["test_set"] == "test"
        assert 0 <= row["sacrebleu"] <= 100 and 0 <= row["tokenized_bleu"] <= 100
        assert row["sacrebleu_signature"].startswith("nrefs:1|case:mixed|")
        rounds = [f"{row['model']}.test.r{r}.gen" for r in (1, 2)]
        assert row["speed_source"] == ", ".join(rounds)  # the speed stage's two rounds
        assert row["sentences_per_second"] > 0 and row["speedup_vs_teacher"] > 0
        assert len(row["rounds_sentences_per_second"]) == 2
        hyps = (work / "eval" / f"{row['model']}.test.hyp").read_text().splitlines()
        assert len(hyps) == 60
    assert results["rows"][0]["speedup_vs_teacher"] == 1.0
    teacher, *students = results["rows"]  # the students share one architecture, and one speed
    assert "speed_shared_with" not in teacher and teacher["architecture"] != students[0]["architecture"]
    assert len({s["architecture"] for s in students}) == 1
    assert all(s["speed_shared_with"] == MODELS[1:] for s in students)
    pooled = sorted(x for s in students for x in s["rounds_sentences_per_second"])
    assert {s["sentences_per_second"] for s in students} == {round((pooled[2] + pooled[3]) / 2, 2)}
    markdown = (work / "results.md").read_text()
    assert "one architecture: one speed, the median of their 6 timing runs" in markdown
    assert "| model | test set | sacreBLEU |" in markdown and "sacreBLEU signature" in markdown
    speed_log = (work / "speed" / "teacher.test.r1.gen").read_text()
    assert "Translated 60 sentences" in speed_log  # nothing dropped from the test set


def test_translate_raw_text_as_the_pipeline_prepares_it(recipe_run, tmp_path):
    """wd-translate prepares raw text exactly as the recipe (Moses, BPE with its
    vocabulary filter: identical to bpe/test.en), decodes as fairseq-generate (one
    sentence a batch, so the same per-sentence length limit) and detokenizes as
    wd-evaluate; a CTranslate2 float32 export, greedy, gives fairseq's greedy output."""
    from sacremoses import MosesDetokenizer

    from wd_fairseq.translate import TextCodec

    work = recipe_run[0]
    bpe = ["--bpe-codes", work / "bpe" / "codes.en", "--bpe-vocabulary", work / "bpe" / "vocab.en",
           "--bpe-vocabulary-threshold", "1"]
    codec = TextCodec("en", "ro", "moses", str(work / "bpe" / "codes.en"), str(work / "bpe" / "vocab.en"), 1)
    raw = read_lines(str(work / "raw" / "test.en"))
    assert [" ".join(codec.encode(line)) for line in raw] == read_lines(str(work / "bpe" / "test.en"))
    student = work / "wd_phase2" / "checkpoint_avg.pt"
    search = ["--max-len-a", "0", "--max-len-b", "20"]
    generated = run_cli("fairseq-generate", work / "data-bin", "--path", student, "--gen-subset", "test",
                        "--beam", "6", "--remove-bpe", "--batch-size", "1", "--required-batch-size-multiple",
                        "1", "--cpu", *search)
    detokenizer = MosesDetokenizer("ro")
    hypotheses = [detokenizer.detokenize(h.split()) for h in read_generate_log_text(generated.stdout + generated.stderr, tmp_path)]
    outputs = {}
    run_cli("wd-export-ct2", student, tmp_path / "ct2", "--quantization", "float32")
    for name, model, beam in (("beam6", student, "6"), ("fairseq", student, "1"),
                              ("ctranslate2", tmp_path / "ct2", "1")):
        run_cli("wd-translate", "--model", model, "--input", work / "raw" / "test.en", "--output",
                tmp_path / f"{name}.ro", "--beam", beam, *bpe, *search)
        outputs[name] = read_lines(str(tmp_path / f"{name}.ro"))
        assert len(outputs[name]) == 60
    # (a float near-tie may fall either way where batches differ: allow 3 of 60)
    assert sum(a == b for a, b in zip(outputs["beam6"], hypotheses)) >= 57
    assert sum(a == b for a, b in zip(outputs["fairseq"], outputs["ctranslate2"])) >= 57
    proc = run_cli("wd-translate", "--model", student, "--bpe-codes", tmp_path / "missing", check=False)
    assert proc.returncode == 1 and "--bpe-codes" in proc.stderr and "no such file" in proc.stderr


def read_generate_log_text(text: str, tmp_path: Path):
    log = tmp_path / "generate.log"
    log.write_text(text)
    return read_generate_log(str(log))[0]


def test_rerun_skips_finished_stages_and_names_unknown_ones(recipe_run):
    work, env, _ = recipe_run
    proc = run_recipe("examples/wmt16_en_ro/run.sh", env=env)
    assert proc.stdout.count("skip ") == len(STAGES)
    proc = run_recipe("examples/wmt16_en_ro/run.sh", "distill", env=env, check=False)
    assert proc.returncode != 0 and "unknown stage 'distill'" in proc.stderr
    assert "prepare teacher kd_data" in proc.stderr


def test_eval_models_scores_only_the_models_named(recipe_run):
    """A rerun of evaluate scores again but keeps a translation made by the same command from
    the same checkpoint; a newer checkpoint or another beam translates again."""
    work, env, _ = recipe_run
    records = {name: work / "eval" / f"{name}.test.json" for name in ("teacher", "kd_student")}
    before = {name: path.stat().st_mtime_ns for name, path in records.items()}
    translation = work / "eval" / "kd_student.test.gen"
    made = translation.stat().st_mtime_ns
    run_recipe("examples/wmt16_en_ro/run.sh", "evaluate",
               env=dict(env, FORCE="1", EVAL_MODELS="kd_student"))
    assert records["teacher"].stat().st_mtime_ns == before["teacher"]
    assert records["kd_student"].stat().st_mtime_ns > before["kd_student"]
    assert translation.stat().st_mtime_ns == made
    assert f"(kept: {translation} was made earlier from the same inputs)" in (work / "logs" / "evaluate.log").read_text()
    checkpoint = work / "kd_student" / "checkpoint_avg.pt"
    os.utime(checkpoint, ns=(time.time_ns(), time.time_ns()))  # as if trained again
    run_recipe("examples/wmt16_en_ro/run.sh", "evaluate", env=dict(env, FORCE="1", EVAL_MODELS="kd_student"))
    assert translation.stat().st_mtime_ns > made
    made = translation.stat().st_mtime_ns
    run_recipe("examples/wmt16_en_ro/run.sh", "evaluate", env=dict(env, FORCE="1", EVAL_MODELS="kd_student", BEAM="2"))
    assert translation.stat().st_mtime_ns > made and "--beam 2" in translation.with_suffix(".gen.made").read_text()
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert {"teacher", "kd_student", "wd_phase1", "wd_student"} <= {r["model"] for r in rows}
    proc = run_recipe("examples/wmt16_en_ro/run.sh", "evaluate",
                      env=dict(env, FORCE="1", EVAL_MODELS="kd_student student"), check=False)
    assert proc.returncode != 0 and "EVAL_MODELS: unknown model 'student'" in proc.stderr


def test_extra_models_are_scored_under_their_names(recipe_run, tmp_path):
    """EXTRA_MODELS: any checkpoint (here a copy of the KD student's last save) scored
    beside the pipeline's models; a malformed entry or a taken name is refused."""
    work, env, _ = recipe_run
    first_save = tmp_path / "kd_last.pt"  # (EXTRA_MODELS paths have no spaces; WORK's do)
    shutil.copy(work / "kd_student" / "checkpoint_last.pt", first_save)
    run_recipe("examples/wmt16_en_ro/run.sh", "evaluate", env=dict(
        env, FORCE="1", EVAL_MODELS="kd_5", EXTRA_MODELS=f"kd_5={first_save}"))
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert any(r["model"] == "kd_5" and "sacrebleu" in r for r in rows)
    assert "kd_student" in {r["model"] for r in rows}  # earlier records stay in the table
    for extra, message in [("kd 5", "'kd' is not NAME=CHECKPOINT"), ("teacher=x.pt", "the name 'teacher' is taken")]:
        proc = run_recipe("examples/wmt16_en_ro/run.sh", "config", env=dict(env, EXTRA_MODELS=extra), check=False)
        assert proc.returncode != 0 and message in proc.stderr


def test_selection_student_trains_from_the_teachers_selection(recipe_run):
    """The optional sel_student stage (Selection + KD): wd-init-student, then the KD
    student's training from it; scored alone with EVAL_MODELS."""
    work, env, _ = recipe_run
    run_recipe("examples/wmt16_en_ro/run.sh", "sel_student", env=env)
    log = (work / "logs" / "sel_student.log").read_text()
    assert re.search(r"loading pretrained model from .*/sel_student/init\.pt", log)
    assert "kd_loss" in log and "num_updates 10" in log  # KD_ALPHA=0.5, KD_UPDATES=10
    assert (work / "sel_student" / "checkpoint_avg.pt").is_file()
    run_recipe("examples/wmt16_en_ro/run.sh", "evaluate",
               env=dict(env, FORCE="1", EVAL_MODELS="sel_student"))
    document = json.loads((work / "results.json").read_text())
    assert any(r["model"] == "sel_student" and "sacrebleu" in r for r in document["rows"])
    assert any("sel_student: KD training from wd-init-student --layers spread --dims first" in n
               for n in document["notes"])


def test_update_counts_without_a_final_save_are_refused_before_any_work(tmp_path):
    env = dict(TINY, WORK=str(tmp_path), KD_UPDATES="24")
    proc = run_recipe("examples/wmt16_en_ro/run.sh", env=env, check=False)
    assert proc.returncode != 0
    assert "KD_UPDATES=24 is not a multiple of SAVE_INTERVAL_UPDATES=5" in proc.stderr
    assert "start prepare" not in proc.stdout and not (tmp_path / "done").exists()


def test_stages_with_fewer_saves_than_they_average_are_refused_before_any_work(tmp_path):
    env = dict(TINY, WORK=str(tmp_path), PHASE2_UPDATES="5", PHASE2_AVG_LAST="2")
    proc = run_recipe("examples/wmt16_en_ro/run.sh", env=env, check=False)
    assert proc.returncode != 0
    assert ("PHASE2_UPDATES=5 gives 1 saves (SAVE_INTERVAL_UPDATES=5), fewer than the 2 the "
            "stage averages (PHASE2_AVG_LAST)") in proc.stderr
    assert "start prepare" not in proc.stdout and not (tmp_path / "done").exists()


def test_a_stage_whose_checkpoints_do_not_fit_is_refused_before_it_starts(tmp_path):
    """A teacher too big for this disk: its stage is refused by the up-front estimate of
    its checkpoints, before fairseq-train starts; a smaller one passes that check."""
    env = dict(TINY, WORK=str(tmp_path), TEACHER_DIM="65536", TEACHER_FFN="262144")
    proc = run_recipe("examples/wmt16_en_ro/run.sh", "teacher", env=env, check=False)
    assert proc.returncode != 0
    assert re.search(
        rf"^pipeline\.sh: error: {tmp_path}/teacher: not enough disk space for the "
        r"checkpoints of stage teacher \(6 x [\d.]+ GiB\): it needs about [\d.]+ GiB \(estimate\), "
        r"[\d.]+ [KMG]iB is free there\. Fix: free space there, or set WORK to a bigger disk \(or "
        r"lower AVG_LAST\); a rerun resumes the stage$", proc.stdout, re.M), proc.stdout[-3000:]
    assert "start teacher" in proc.stdout and "fairseq-train" not in proc.stdout
    assert not (tmp_path / "teacher").exists()


def gpu_box(directory: Path, n: int) -> str:
    """A PATH whose stand-in ``nvidia-smi -L`` lists ``n`` GPUs (as on an n-GPU server)."""
    directory.mkdir(parents=True, exist_ok=True)
    smi = directory / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i}a2b3c4d-0000-1111-2222-33334444555{i})\\n"
                    for i in range(n))
    smi.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\nprintf '{lines}'\n")
    smi.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def config(pair, env):
    """``run.sh config``'s settings (the lines before the review)."""
    out = run_recipe(f"examples/{pair}/run.sh", "config", env=env).stdout
    settings = out.split("\n\n", 1)[0]
    return dict(line.split("=", 1) for line in settings.splitlines()), out


def test_pair_scripts_configure_the_shared_pipeline(tmp_path):
    env = {"WORK": str(tmp_path), "NUM_GPUS": "2", "PATH": gpu_box(tmp_path / "bin", 8)}
    cfg = {pair: config(pair, env)[0] for pair in ("wmt16_en_ro", "wmt14_en_de")}
    assert cfg["wmt16_en_ro"]["TGT"] == "ro" and cfg["wmt14_en_de"]["TGT"] == "de"
    assert cfg["wmt14_en_de"]["BLEU_CONVENTION"] == "ende-compound"
    assert cfg["wmt16_en_ro"]["BLEU_CONVENTION"] == "ro"
    assert config("wmt16_en_ro", dict(env, RO_DIACRITICS="remove"))[0]["BLEU_CONVENTION"] == "ro-nodiac"
    assert cfg["wmt14_en_de"]["UPDATE_FREQ"] == "4"  # 8 GPUs x 4096 tokens on 2 GPUs
    assert cfg["wmt16_en_ro"]["FP16"] == "1" and cfg["wmt16_en_ro"]["LR"] == "7e-4"
    proc = run_recipe("examples/nist12_zh_en/run.sh", "config", env=env, check=False)
    assert proc.returncode != 0 and "NIST_DIR" in proc.stderr
    out = run_recipe("examples/nist12_zh_en/run.sh", "config",
                     env=dict(env, NIST_DIR=str(tmp_path))).stdout
    assert "TEST_SETS=mt02 mt03 mt04 mt05 mt08" in out and "VALID_SET=mt06" in out
    assert "TOKENIZE_SRC=none" in out and "BLEU_CONVENTION=moses-lc" in out


# -- GPUs, the batch and the plan ---------------------------------------------------------

@pytest.mark.parametrize("visible, num_gpus, world, update_freq", [
    (None, None, 8, 1),        # all 8 GPUs
    ("0,1", None, 2, 4),       # CUDA_VISIBLE_DEVICES narrows what fairseq sees
    ("0,1,2,3", None, 4, 2),
    (None, "2", 2, 4),         # fewer processes than visible GPUs: fairseq must be told
    ("", None, 1, 8),          # no GPU visible: one process
])
def test_world_size_is_the_one_the_update_frequency_assumes(tmp_path, visible, num_gpus, world,
                                                             update_freq):
    """nvidia-smi -L lists 8 GPUs; fairseq trains on --distributed-world-size processes,
    and GPUs x 4096 tokens x update-freq must be the authors' 32,768."""
    env = {"WORK": str(tmp_path), "PATH": gpu_box(tmp_path / "bin", 8)}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if num_gpus is not None:
        env["NUM_GPUS"] = num_gpus
    settings, out = config("wmt14_en_de", env)
    assert (settings["NUM_GPUS"], settings["UPDATE_FREQ"]) == (str(world), str(update_freq))
    assert settings["EFFECTIVE_TOKENS"] == "32768"
    assert f"batch: {world} x 4096 tokens x update-freq {update_freq} = 32,768 tokens per update" in out
    plan = run_recipe("examples/wmt14_en_de/run.sh", "plan", env=env).stdout
    trains = training_commands(plan)
    assert len(trains) == 4
    for line in trains:
        launch = "  fairseq-train " if world == 1 else \
            f"  torchrun --standalone --nproc_per_node {world} --no-python wd-train "
        assert line.startswith(launch)
        assert f"--distributed-world-size {world} " in line
        assert f"--update-freq {update_freq} " in line


def training_commands(plan):
    """The training launches of a plan (one process: fairseq-train; more: torchrun)."""
    return [line for line in plan.splitlines()
            if line.startswith("  fairseq-train ") or line.startswith("  torchrun ")]


def test_batches_that_miss_the_authors_are_refused_or_flagged(tmp_path):
    env = {"WORK": str(tmp_path), "PATH": gpu_box(tmp_path / "bin", 8)}
    proc = run_recipe("examples/wmt14_en_de/run.sh", "config", env=dict(env, NUM_GPUS="3"),
                      check=False)
    assert proc.returncode != 0
    assert "3 GPU(s) x MAX_TOKENS=4096 x update-freq 3 = 36,864 tokens per update, not " \
           "BATCH_TOKENS=32,768" in proc.stderr and "ALLOW_BATCH_MISMATCH=1" in proc.stderr
    _, out = config("wmt14_en_de", dict(env, NUM_GPUS="3", ALLOW_BATCH_MISMATCH="1"))
    assert "EFFECTIVE_TOKENS=36864" in out and "EFFECTIVE_TOKENS=36864 (authors: 32768)" in out
    proc = run_recipe("examples/wmt14_en_de/run.sh", "teacher",
                      env=dict(env, NUM_GPUS="4", CUDA_VISIBLE_DEVICES="0,1"), check=False)
    assert proc.returncode != 0 and "NUM_GPUS=4 but 2 GPU(s) are visible" in proc.stderr
    assert not (tmp_path / "done").exists()  # refused before any stage


def test_visible_gpus_follows_cuda_rules():
    from recipe_tools import visible_gpus

    listing = "".join(f"GPU {i}: NVIDIA A100 (UUID: GPU-{i}{i}{i}-abc)\n" for i in range(4))
    assert visible_gpus(listing, None) == 4
    assert visible_gpus(listing, "") == 0
    assert visible_gpus(listing, "2") == 1
    assert visible_gpus(listing, "0,3") == 2
    assert visible_gpus(listing, "1,7,2") == 1  # CUDA stops at the first invalid entry
    assert visible_gpus(listing, "-1") == 0
    assert visible_gpus(listing, "GPU-222,GPU-000-abc") == 2  # UUIDs and their prefixes
    assert visible_gpus("", None) == 0


#: The authors' settings (docs/method.md section 1), independent of the code under test.
AUTHORS_FLAGS = {
    "--optimizer": "adam", "--adam-betas": "(0.9,0.98)", "--lr": "7e-4",
    "--lr-scheduler": "inverse_sqrt", "--warmup-init-lr": "1e-7", "--weight-decay": "0.0",
    "--clip-norm": "0.0", "--dropout": "0.1", "--attention-dropout": "0.1",
    "--activation-dropout": "0.1", "--criterion": "label_smoothed_cross_entropy",
    "--label-smoothing": "0.1", "--seed": "1",
}
AUTHORS_STAGES = {  # --warmup-updates, --max-update (the teacher's is the pair's)
    "kd_student": ("4000", "30000"), "wd_phase1": ("4000", "30000"), "wd_phase2": ("1000", "30000"),
}
AUTHORS_TEACHER = {"--encoder-layers": "6", "--encoder-embed-dim": "512",
                   "--encoder-ffn-embed-dim": "2048", "--encoder-attention-heads": "8"}


@pytest.mark.parametrize("pair", ["wmt14_en_de", "wmt16_en_ro", "nist12_zh_en"])
@pytest.mark.parametrize("gpus, visible", [(8, None), (4, "0,1,2,3"), (1, None)])
def test_plan_is_the_authors_setting(tmp_path, pair, gpus, visible):
    """``run.sh plan`` on an 8-GPU box (4 of them visible; a 1-GPU box): every training
    stage's resolved command has 32,768 tokens per update and the authors' flags."""
    env = {"WORK": str(tmp_path / "w"), "NIST_DIR": str(tmp_path),
           "PATH": gpu_box(tmp_path / "bin", 8 if gpus > 1 else 1)}
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible
    plan = run_recipe(f"examples/{pair}/run.sh", "plan", env=env).stdout
    assert "differences from the authors' settings (docs/method.md section 1): none" in plan
    assert f"training processes: {gpus} (--distributed-world-size {gpus})" in plan
    assert "= 32,768 tokens per update" in plan
    assert re.search(r"^disk \(estimate.*\): \d+ GB$", plan, re.M)
    stages = dict(re.findall(r"^== (\w+)\n(.*?)(?=^== |\Z)", plan, re.M | re.S))
    assert list(stages) == STAGES
    for stage in ("teacher", "kd_student", "wd_phase1", "wd_phase2"):
        [line] = training_commands(stages[stage])
        args = shlex.split(line)
        flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        for name, value in AUTHORS_FLAGS.items():
            assert flag[name] == value, (stage, name)
        world, tokens, freq = (int(flag[f]) for f in
                               ("--distributed-world-size", "--max-tokens", "--update-freq"))
        assert (world, world * tokens * freq) == (gpus, 32768), stage
        assert "--fp16" in args, stage
        if stage != "teacher":
            assert (flag["--warmup-updates"], flag["--max-update"]) == AUTHORS_STAGES[stage]
        if stage in ("teacher", "kd_student"):
            assert all(flag[k] == v for k, v in AUTHORS_TEACHER.items()), stage
        if stage != "teacher":  # stu1: a 1-layer 256/1024/8 decoder
            if stage != "wd_phase2":  # (phase 2 takes the materialised student's flags)
                assert args[-args[::-1].index("--decoder-layers")] == "1"
    assert "--rule epochs --last 5" in stages["teacher"]  # the authors' teacher average
    assert "--beam 6 --lenpen 1.0" in stages["kd_data"]
    [generate, *_] = [line for line in stages["evaluate"].splitlines() if "fairseq-generate" in line]
    assert "--beam 6 " in generate and "--lenpen 1.0 " in generate


def test_phase2_can_continue_phase1s_learning_rate_curve(tmp_path):
    """PHASE2_SCHEDULE=continue: phase 2 takes inverse_sqrt_offset from update
    PHASE1_UPDATES with phase 1's warmup (the plan names it as a difference from the
    authors' restart); another value is refused before any work."""
    env = {"WORK": str(tmp_path / "w"), "PATH": gpu_box(tmp_path / "bin", 8),
           "PHASE2_SCHEDULE": "continue"}
    plan = run_recipe("examples/wmt16_en_ro/run.sh", "plan", env=env).stdout
    stages = dict(re.findall(r"^== (\w+)\n(.*?)(?=^== |\Z)", plan, re.M | re.S))
    [line] = training_commands(stages["wd_phase2"])
    args = shlex.split(line)
    flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert (flag["--lr-scheduler"], flag["--update-offset"], flag["--warmup-updates"]) == \
        ("inverse_sqrt_offset", "30000", "4000")
    assert "--user-dir" in flag
    assert "PHASE2_SCHEDULE" in plan.split("differences from the authors' settings", 1)[1].split("\n\n")[0]
    proc = run_recipe("examples/wmt16_en_ro/run.sh", "plan", env=dict(env, PHASE2_SCHEDULE="cont"),
                      check=False)
    assert proc.returncode == 1 and "PHASE2_SCHEDULE=cont: choose restart" in proc.stderr


def test_prepare_with_one_bpe_per_language_keeps_what_it_made_when_rerun(tmp_path):
    """JOINT_BPE=0 (the Zh-En recipe's): codes and vocabulary learned per language, the
    intermediate segmentation removed; a rerun of prepare (FORCE=1) keeps the files made
    earlier (Command.creates) and binarises again."""
    raw = raw_en_ro(tmp_path / "raw", n_train=100)
    work = tmp_path / "work"
    env = dict(TINY, RAW_DIR=str(raw), WORK=str(work), JOINT_BPE="0")
    run_recipe("examples/wmt16_en_ro/run.sh", "prepare", env=env)
    codes = {lang: (work / "bpe" / f"codes.{lang}").read_text() for lang in ("en", "ro")}
    assert codes["en"] != codes["ro"] and all((work / "bpe" / f"vocab.{lang}").stat().st_size for lang in codes)
    assert not list((work / "bpe").glob("train.nojoint.*")) and not (work / "data-bin.tmp").exists()
    assert (work / "data-bin" / "test.en-ro.ro.bin").is_file()
    made = {path: path.stat().st_mtime_ns for path in [*(work / "tok").iterdir(), *(work / "bpe").iterdir()]}
    binarised = (work / "data-bin" / "train.en-ro.en.bin").stat().st_mtime_ns
    run_recipe("examples/wmt16_en_ro/run.sh", "prepare", env=dict(env, FORCE="1"))
    assert {path: path.stat().st_mtime_ns for path in made} == made
    assert (work / "data-bin" / "train.en-ro.en.bin").stat().st_mtime_ns > binarised
    assert "(kept: " in (work / "logs" / "prepare.log").read_text()


def test_several_references_are_found_in_number_order_and_a_missing_one_is_named(tmp_path):
    """NIST-style test sets (SET.TGT0, SET.TGT1, ..., SET.TGT10): prepare tokenizes the first
    as the test set's target, evaluate scores against all of them in number order; a set
    without any reference stops prepare naming the file."""
    import recipe_stages
    from wd_fairseq.teacher import WDSetupError

    raw = raw_en_ro(tmp_path / "raw", n_train=20)
    refs = [f"test.ro{i}" for i in (0, 1, 2, 10)]
    for name in refs:
        shutil.copy(raw / "test.ro", raw / name)
    (raw / "test.ro").unlink()
    settings, _ = config("wmt16_en_ro", dict(TINY, RAW_DIR=str(raw), WORK=str(tmp_path / "w")))
    recipe = recipe_stages.Recipe(settings)
    prepare = [a.argv for a in recipe_stages.BUILDERS["prepare"](recipe).actions if hasattr(a, "argv")]
    [tokenize] = [argv for argv in prepare if "tokenize" in argv and argv[-1].endswith("tok/test.ro")]
    assert tokenize[-2] == str(tmp_path / "w" / "raw" / "test.ro0")
    recipe_stages.link_data(str(raw), recipe.path("raw"))
    [score, *_] = [a.argv for a in recipe_stages.BUILDERS["evaluate"](recipe).actions
                   if hasattr(a, "argv") and "score" in a.argv]
    given = score[score.index("--refs") + 1:score.index("--lang")]
    assert given == [str(tmp_path / "w" / "raw" / name) for name in refs]
    (raw / "test.ro0").unlink()
    for name in refs[1:]:
        (raw / name).unlink()
    missing = [a for a in recipe_stages.BUILDERS["prepare"](recipe_stages.Recipe(settings)).actions
               if getattr(a, "func", None) is recipe_stages.require_files]
    with pytest.raises(WDSetupError, match=r"raw/test\.ro: missing\. Fix: provide test\.ro"):
        missing[0]()


def test_prepare_downloads_checks_and_concatenates(tmp_path):
    """The download path on a local archive (file:// URL): checksum, extraction, and
    concatenation of TRAIN_PREFIXES; valid/test come from RAW-like files already in place."""
    raw = raw_en_ro(tmp_path / "raw", n_train=100)
    (tmp_path / "pack" / "corpus").mkdir(parents=True)
    for lang in ("en", "ro"):
        lines = (raw / f"train.{lang}").read_text().splitlines()
        (tmp_path / "pack" / "corpus" / f"a.{lang}").write_text("\n".join(lines[:60]) + "\n")
        (tmp_path / "pack" / f"b.{lang}").write_text("\n".join(lines[60:]) + "\n")
    archive = tmp_path / "train.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "pack", arcname=".")
    work = tmp_path / "work"
    (work / "raw").mkdir(parents=True)
    for split in ("valid", "test"):
        for lang in ("en", "ro"):
            (work / "raw" / f"{split}.{lang}").write_text((raw / f"{split}.{lang}").read_text())
    checksums = tmp_path / "SHA256SUMS"
    checksums.write_text(f"{'0' * 64}  train.tgz\n")
    env = dict(TINY, WORK=str(work), TRAIN_URLS=f"file://{archive}",
               TRAIN_PREFIXES="corpus/a b", CHECKSUMS=str(checksums))
    proc = run_recipe("examples/wmt16_en_ro/run.sh", "prepare", env=env, check=False)
    assert proc.returncode != 0  # the stage's messages go to its log and stdout
    assert "expected 0000" in proc.stdout and "delete the file" in proc.stdout
    checksums.write_text(f"{hashlib.sha256(archive.read_bytes()).hexdigest()}  train.tgz\n")
    run_recipe("examples/wmt16_en_ro/run.sh", "prepare", env=env)
    for lang in ("en", "ro"):
        assert (work / "raw" / f"train.{lang}").read_text() == (raw / f"train.{lang}").read_text()
    assert (work / "data-bin" / "train.en-ro.en.bin").is_file()
    assert not (work / "downloads" / "SHA256SUMS.recorded").exists()


# -- wd-evaluate ------------------------------------------------------------------------

def test_tokenized_bleu_conventions():
    refs = [["Das ist ein E-Mail-Test.", "Hallo Welt!"]]
    hyps = ["Das ist ein E-Mail-Test.", "hallo welt !"]
    cs = score(hyps, refs, "de", "moses")
    lc = score(hyps, refs, "de", "moses-lc")
    assert lc["tokenized_bleu"] == 100.0 > cs["tokenized_bleu"]
    assert lc["sacrebleu"] == cs["sacrebleu"] < 100  # sacreBLEU is cased, on raw text
    assert cs["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # En-De: compounds split as ##AT##-##AT##, so a missed hyphen costs more n-grams
    at = score(["Das ist ein E-Mail Test ."], [["Das ist ein E-Mail-Test."]], "de", "ende-compound")
    plain = score(["Das ist ein E-Mail Test ."], [["Das ist ein E-Mail-Test."]], "de", "moses")
    assert 0 < at["tokenized_bleu"] and at["tokenized_bleu"] != plain["tokenized_bleu"]
    # several references (NIST): the best-matching one counts
    multi = score(["the cat sat on the mat"], [["a dog ran over the road"], ["The cat sat on the mat"]],
                  "en", "moses-lc")
    assert multi["references"] == 2 and multi["tokenized_bleu"] == 100.0
    with pytest.raises(EvaluationError, match="reference 0 has 1 lines"):
        score(["a", "b"], [["a"]], "en", "moses")


def test_generate_log_parsing(tmp_path):
    log = tmp_path / "gen.log"
    log.write_text("S-1\tx\nH-1\t-0.5\tsecond line\nH-0\t-0.1\tfirst\nD-0\t-0.1\tfirst\n"
                   "2026 | INFO | fairseq_cli.generate | Translated 2 sentences (7 tokens) in "
                   "0.5s (4.00 sentences/s, 14.00 tokens/s)\n")
    hyps, timing = read_generate_log(str(log))
    assert hyps == ["first", "second line"] and timing["sentences_per_second"] == 4.0
    log.write_text("H-0\t-0.1\tfirst\nH-2\t-0.1\tthird\nTranslated 2 sentences (7 tokens) in "
                   "0.5s (4.00 sentences/s, 14.00 tokens/s)\n")
    with pytest.raises(EvaluationError, match="not 0..1"):
        read_generate_log(str(log))
    log.write_text("H-0\t-0.1\tfirst\n")
    with pytest.raises(EvaluationError, match="complete output of fairseq-generate, stdout and stderr"):
        read_generate_log(str(log))


def test_results_table_relative_speed():
    records = [
        {"model": "teacher", "test_set": "mt02", "sacrebleu": 40.0, "sentences_per_second": 10.0},
        {"model": "wd_student", "test_set": "mt02", "sacrebleu": 39.5, "sentences_per_second": 25.0},
        {"model": "wd_student", "test_set": "mt02", "sentences_per_second": 30.0,
         "speed_source": "speed.gen"},  # a later speed record wins
    ]
    document, markdown = results_table(records, "teacher", "NIST12 Zh-En")
    student = document["rows"][1]
    assert student["speedup_vs_teacher"] == 3.0 and student["sacrebleu"] == 39.5
    assert "| wd_student | mt02 | 39.5 | - | - | 30.0 | 3.0x |" in markdown


def test_results_table_one_speed_per_architecture():
    """Students of one architecture get the median of all their timing rounds; a model
    of another architecture, or of none recorded, keeps its own."""
    records = [
        {"model": "teacher", "test_set": "t", "architecture": "big", "sentences_per_second": 10.0,
         "rounds_sentences_per_second": [10.0, 9.0, 11.0]},
        {"model": "kd", "test_set": "t", "architecture": "small", "sentences_per_second": 20.0,
         "rounds_sentences_per_second": [20.0, 19.0, 21.0]},
        {"model": "wd", "test_set": "t", "architecture": "small", "sentences_per_second": 30.0,
         "rounds_sentences_per_second": [30.0, 29.0, 31.0]},
        {"model": "other", "test_set": "t", "sentences_per_second": 5.0,
         "rounds_sentences_per_second": [5.0]},
    ]
    document, markdown = results_table(records, "teacher", "T")
    speeds = {row["model"]: row["sentences_per_second"] for row in document["rows"]}
    assert speeds == {"teacher": 10.0, "kd": 25.0, "wd": 25.0, "other": 5.0}
    assert document["rows"][1]["speedup_vs_teacher"] == 2.5
    assert "kd, wd (t) have one architecture: one speed, the median of their 6 timing runs" in markdown


def test_speed_record_is_the_median_of_its_rounds(tmp_path):
    logs = []
    for i, rate in enumerate((12.0, 30.0, 18.0)):
        logs.append(tmp_path / f"r{i}.gen")
        logs[-1].write_text(f"H-0\t-0.1\tx\nTranslated 1 sentences (2 tokens) in 0.1s "
                            f"({rate} sentences/s, 20.0 tokens/s)\n")
    out = tmp_path / "speed.json"
    evaluation.cli_main(["speed", "--name", "m", "--generate-log", *map(str, logs), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["sentences_per_second"] == 18.0
    assert record["rounds_sentences_per_second"] == [12.0, 30.0, 18.0]
    assert "architecture" not in record  # no --checkpoint


def test_score_names_the_flag_when_generate_left_sentences_out(tmp_path):
    log = tmp_path / "gen.log"
    log.write_text("H-0\t-0.1\ta b\nTranslated 1 sentences (2 tokens) in 0.1s (10.0 sentences/s, "
                   "20.0 tokens/s)\n")
    refs = tmp_path / "ref.en"
    refs.write_text("a b\nc d\n")
    with pytest.raises(SystemExit, match=r"gen.log has 1 hypotheses but .*ref.en has 2 lines.*"
                                         r"--required-batch-size-multiple 1"):
        evaluation.cli_main(["score", "--generate-log", str(log), "--refs", str(refs), "--lang", "en",
                             "--name", "m", "--out", str(tmp_path / "s.json")])


# -- text: "\\n" is the only line end --------------------------------------------------------

def test_text_tools_split_lines_on_newline_only(tmp_path):
    """tokenize (both modes), clean, concat, check-aligned and wd-evaluate's reference
    reader keep a line with \\r, \\x85, \\u2028, \\u2029 or a form feed inside as one line,
    and count a last line without \\n."""
    src = ["a b\rc", "d\x85e f", "g\u2028h", "i\x0cj k", "l\u2029m", "last line"]
    tgt = ["x y z", "u v", "p q", "r s t", "n o", "final"]
    (tmp_path / "c.en").write_bytes("\n".join(src).encode())  # no final newline
    (tmp_path / "c.ro").write_bytes(("\n".join(tgt) + "\n").encode())
    recipe_tools.main(["check-aligned", str(tmp_path / "c.en"), str(tmp_path / "c.ro")])
    recipe_tools.main(["concat", "--src-lang", "en", "--tgt-lang", "ro", "--out-prefix",
                       str(tmp_path / "all"), str(tmp_path / "c"), str(tmp_path / "c")])
    joined = (tmp_path / "all.en").read_bytes().decode("utf-8")
    assert joined.split("\n")[:-1] == src + src  # the unterminated last line stays apart
    for mode in ("moses", "none"):
        out = tmp_path / f"tok.{mode}"
        recipe_tools.main(["tokenize", "--lang", "en", "--mode", mode, "--workers", "1",
                           str(tmp_path / "c.en"), str(out)])
        lines = out.read_text(encoding="utf-8").splitlines()  # splits at every break kind
        assert lines == ["a b c", "d e f", "g h", "i j k", "l m", "last line"], mode
    recipe_tools.main(["clean", "--src", str(tmp_path / "c.en"), "--tgt", str(tmp_path / "c.ro"),
                       "--out-prefix", str(tmp_path / "clean"), "--src-lang", "en",
                       "--tgt-lang", "ro", "--ratio", "9"])
    assert (tmp_path / "clean.ro").read_text().split("\n")[:-1] == tgt
    assert read_lines(str(tmp_path / "c.en")) == src
    with pytest.raises(SystemExit, match="has 6 lines but .*short.ro has 5"):
        (tmp_path / "short.ro").write_text("\n".join(tgt[:5]) + "\n")
        recipe_tools.main(["check-aligned", str(tmp_path / "c.en"), str(tmp_path / "short.ro")])


# -- reference ceilings: the reference through the recipe's preprocessing and back ----------

def round_trip(lines, lang, tmp_path, *flags):
    """The reference as a perfect system outputs it: the recipe's tokenize (training
    text), then wd-evaluate's detokenization of hypotheses."""
    from sacremoses import MosesDetokenizer

    raw, tok = tmp_path / f"ref.{lang}", tmp_path / f"tok.{lang}"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe_tools.main(["tokenize", "--lang", lang, "--mode", "moses", "--workers", "1",
                       *flags, str(raw), str(tok)])
    detok = MosesDetokenizer(lang)
    return [detok.detokenize(line.split()) for line in tok.read_text(encoding="utf-8").splitlines()]


GERMAN = ["„Das ist ein E-Mail-Test“ – sagte er, ‚nicht wahr‘?",
          "Die Preise stiegen um 3,5 % (auf 1.200 Euro) – so der Bericht.",
          "«Schön», sagt sie: „Gut… “"]
ROMANIAN = ["Ştiinţa şi ţara „bună” – spune el.",
            "Preşedintele a declarat: „Ţara noastră îşi respectă angajamentele”.",
            "În 2016, România a găzduit «summitul» – cu 3,5 % mai mult."]


def test_en_de_reference_ceiling_is_100(tmp_path):
    """A perfect German output („“ and – normalised as in training) scores 100 in the
    authors' En-De convention: both sides are normalised."""
    hypotheses = round_trip(GERMAN, "de", tmp_path)
    assert hypotheses != GERMAN  # the quotes and dashes did change
    for convention in ("ende-compound", "moses", "moses-lc"):
        assert score(hypotheses, [GERMAN], "de", convention)["tokenized_bleu"] == 100.0


def test_romanian_is_normalised_and_its_reference_ceiling_is_100(tmp_path):
    hypotheses = round_trip(ROMANIAN, "ro", tmp_path)
    assert "ş" not in "".join(hypotheses) and "Ştiinţa" not in hypotheses[0]
    assert hypotheses[0].startswith("Știința și țara")
    assert score(hypotheses, [ROMANIAN], "ro", "ro")["tokenized_bleu"] == 100.0
    plain = round_trip(ROMANIAN, "ro", tmp_path, "--remove-diacritics")
    assert plain[0].startswith("Stiinta si tara")
    assert score(plain, [ROMANIAN], "ro", "ro-nodiac")["tokenized_bleu"] == 100.0
    # cedilla and comma-below spellings of one word are the same word in both conventions
    for convention in ("ro", "ro-nodiac"):
        assert score(["Ştiinţa şi ţara sunt aici ."], [["Știința și țara sunt aici ."]], "ro",
                     convention)["tokenized_bleu"] == 100.0
    assert score(plain, [ROMANIAN], "ro", "ro")["tokenized_bleu"] < 100  # diacritics count


# -- phase 2 flags, averaging rules -------------------------------------------------------

def test_phase2_flags_carry_the_students_dropout():
    args = {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1,
            "encoder_layers": 6, "decoder_layers": 1, "share_all_embeddings": False}
    flags = phase2_flags(args)
    for name in ("--dropout", "--attention-dropout", "--activation-dropout"):
        assert flags[flags.index(name) + 1] == "0.1"


def test_checkpoints_to_average_by_rule(tmp_path):
    names = ["checkpoint1.pt", "checkpoint_1_1000.pt", "checkpoint2.pt", "checkpoint_2_2000.pt",
             "checkpoint10.pt", "checkpoint_10_3000.pt", "checkpoint_last.pt", "checkpoint_best.pt"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, ns=(i * 10**9, i * 10**9))
    pick = recipe_tools.checkpoints_to_average
    assert [Path(p).name for p in pick(str(tmp_path), "epochs", 2)] == \
        ["checkpoint2.pt", "checkpoint10.pt"]  # by epoch number, not name or time
    assert [Path(p).name for p in pick(str(tmp_path), "updates", 3)] == \
        ["checkpoint_2_2000.pt", "checkpoint10.pt", "checkpoint_10_3000.pt"]
    with pytest.raises(SystemExit, match="3 epoch-end checkpoints .*, 4 to average"):
        pick(str(tmp_path), "epochs", 4)


# -- training-pair filter ----------------------------------------------------------------

def test_clean_reports_what_each_rule_drops_and_warns_on_a_tight_ratio(tmp_path, capsys):
    """Word-segmented Chinese against English: English often has ~1.6x the tokens; a 1.5
    ratio would drop those pairs wholesale, and clean says so."""
    zh = ["我们 今天 去 北京", "他 说", "", "经济 增长 很 快"]
    en = ["we are going to Beijing today .", "he said it .", "empty", "the economy grows fast"]
    (tmp_path / "t.zh").write_text("\n".join(zh) + "\n", encoding="utf-8")
    (tmp_path / "t.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    args = ["clean", "--src", str(tmp_path / "t.zh"), "--tgt", str(tmp_path / "t.en"),
            "--out-prefix", str(tmp_path / "c"), "--src-lang", "zh", "--tgt-lang", "en"]
    recipe_tools.main(args + ["--ratio", "1.5"])
    out = capsys.readouterr().out
    assert "kept 1 of 4 pairs; dropped 1 with an empty side, 0 longer than 250 tokens, " \
           "2 with a length ratio above 1.5" in out
    assert "WARNING: the length-ratio rule dropped 50.0% of the pairs" in out and "CLEAN_RATIO" in out
    recipe_tools.main(args + ["--ratio", "3"])
    assert "kept 3 of 4 pairs" in capsys.readouterr().out


def test_zh_en_recipe_filters_with_a_ratio_fit_for_word_segmented_chinese(tmp_path):
    settings, _ = config("nist12_zh_en", {"WORK": str(tmp_path), "NIST_DIR": str(tmp_path),
                                          "PATH": gpu_box(tmp_path / "bin", 1)})
    assert settings["CLEAN_RATIO"] == "3"
    assert config("wmt14_en_de", {"WORK": str(tmp_path), "PATH": gpu_box(tmp_path / "bin", 1)}
                  )[0]["CLEAN_RATIO"] == "1.5"


# -- the multi-GPU launch, on CPU ----------------------------------------------------------

def test_multi_process_launch_trains_and_resumes_through_the_recipe(tmp_path):
    """NUM_GPUS=2 with CPU=1: the recipe's own teacher stage launches the way it does on 2
    GPUs (torchrun, one wd-train per device, --distributed-world-size 2), over gloo; stopped
    after 4 updates, the stage resumes from checkpoint_last.pt on both ranks to 8."""
    raw = raw_en_ro(tmp_path / "raw", n_train=300)
    work = tmp_path / "work dir"
    env = dict(TINY, RAW_DIR=str(raw), WORK=str(work), NUM_GPUS="2", BATCH_TOKENS="2000",
               TEACHER_UPDATES="4", SAVE_INTERVAL_UPDATES="2", TRAIN_EXTRA="--log-interval 1")
    run_recipe("examples/wmt16_en_ro/run.sh", "prepare", "teacher", env=env)
    run_recipe("examples/wmt16_en_ro/run.sh", "teacher", env=dict(env, TEACHER_UPDATES="8", FORCE="1"))
    log = (work / "logs" / "teacher.log").read_text()
    assert len(re.findall(r"^batch: 2 GPU process\(es\) x 1000 tokens x update-freq 1 = 2000 tokens", log, re.M)) == 2
    assert "distributed init (rank 0)" in log and "distributed init (rank 1)" in log
    assert "'distributed_world_size': 2" in log
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", log)
    state = torch.load(work / "teacher" / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 8
    assert (work / "teacher" / "checkpoint_avg.pt").is_file()


def test_torchrun_workers_get_their_rank_and_device():
    from wd_fairseq.launch import torchrun_flags

    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert torchrun_flags(["data", "--cpu"], env) == [
        "--distributed-init-method", "env://", "--distributed-no-spawn", "--distributed-rank",
        "1", "--device-id", "1", "--distributed-backend", "gloo"]
    assert torchrun_flags(["data"], env)[-2:] == ["--device-id", "1"]  # GPUs: nccl, fairseq's
    assert torchrun_flags(["data"], {}) == [] == torchrun_flags(["data"], {"WORLD_SIZE": "1", "RANK": "0"})
