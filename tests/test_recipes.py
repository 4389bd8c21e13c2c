"""The recipe machinery: examples/recipes/pipeline.sh driven through a pair's run.sh on a
tiny local corpus (every stage but the download, the same flags, tiny sizes, CPU), the
download/checksum path on a local archive, and wd-evaluate's scoring conventions."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, write_toy_corpus

import wd_fairseq  # noqa: F401
from wd_fairseq.evaluation import (
    EvaluationError,
    read_generate_log,
    results_table,
    score,
)

STAGES = ["prepare", "teacher", "kd_data", "kd_student", "wd_phase1", "materialize",
          "wd_phase2", "evaluate", "speed"]
MODELS = ["teacher", "kd_student", "wd_phase1", "wd_student"]

#: Tiny stand-ins for the real sizes; everything else is the pair script's.
TINY = dict(
    CPU="1", FP16="0", NUM_GPUS="1", MAX_TOKENS="1000", UPDATE_FREQ="1", WORKERS="1", BPE_MERGES="30",
    BPE_VOCAB_THRESHOLD="1", TEACHER_LAYERS="2", TEACHER_DIM="32", TEACHER_FFN="64",
    TEACHER_HEADS="4", STUDENT_DEC_LAYERS="1", STUDENT_DEC_DIM="16", STUDENT_DEC_FFN="32",
    STUDENT_DEC_HEADS="4", LR="5e-3", WARMUP="20", PHASE2_WARMUP="5", TEACHER_UPDATES="20",
    KD_UPDATES="10", PHASE1_UPDATES="10", PHASE2_UPDATES="10", SAVE_INTERVAL_UPDATES="10",
    AVG_LAST="2", KD_ALPHA="0.5", KD_TEMPERATURE="2", KD_MAX_TOKENS="2000",
    EVAL_BATCH_SIZE="64", SPEED_BATCH_SIZE="32", GENERATE_EXTRA="--max-len-a 1.5 --max-len-b 5",
    TRAIN_EXTRA="--validate-interval 100",
)


def run_recipe(script, *args, env, check=True):
    full = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    full["PATH"] = f"{Path(sys.executable).parent}:{full['PATH']}"
    full["PYTHON"] = sys.executable
    full["OMP_NUM_THREADS"] = "1"  # tiny models on shared cores: threads only add overhead
    full.update(env)
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True,
                          env=full)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def raw_en_ro(directory: Path, n_train: int) -> Path:
    write_toy_corpus(directory, n_train=n_train)
    for path in list(directory.iterdir()):
        lang = {"src": "en", "tgt": "ro"}[path.suffix[1:]]
        path.rename(path.with_suffix(f".{lang}"))
    return directory


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """One full tiny run of examples/wmt16_en_ro/run.sh on local text (RAW_DIR)."""
    raw = raw_en_ro(tmp_path_factory.mktemp("raw-en-ro"), n_train=300)
    work = tmp_path_factory.mktemp("work")
    env = dict(TINY, RAW_DIR=str(raw), WORK=str(work))
    proc = run_recipe("examples/wmt16_en_ro/run.sh", env=env)
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


def test_teacher_is_the_average_of_its_last_checkpoints(recipe_run):
    work = recipe_run[0]
    saved = [p for p in (work / "teacher").glob("checkpoint*.pt")
             if p.stem not in ("checkpoint_last", "checkpoint_best", "checkpoint_avg")]
    saved = sorted(saved, key=lambda p: p.stat().st_mtime_ns)[-2:]  # AVG_LAST=2
    last = [torch.load(p, weights_only=True) for p in saved]
    updates = [s["optimizer_history"][-1]["num_updates"] for s in last]
    assert updates[0] < updates[1] == 20  # interval or epoch-end saves, the newest last
    avg = torch.load(work / "teacher" / "checkpoint_avg.pt", weights_only=True)["model"]
    key = "decoder.layers.0.fc1.weight"
    assert torch.allclose(avg[key], (last[0]["model"][key] + last[1]["model"][key]) / 2)


def test_results_table(recipe_run):
    work = recipe_run[0]
    results = json.loads((work / "results.json").read_text())
    assert [row["model"] for row in results["rows"]] == MODELS
    for row in results["rows"]:
        assert row["test_set"] == "test"
        assert 0 <= row["sacrebleu"] <= 100 and 0 <= row["tokenized_bleu"] <= 100
        assert row["sacrebleu_signature"].startswith("nrefs:1|case:mixed|")
        assert row["speed_source"] == f"{row['model']}.test.gen"  # the speed stage's run
        assert row["sentences_per_second"] > 0 and row["speedup_vs_teacher"] > 0
        hyps = (work / "eval" / f"{row['model']}.test.hyp").read_text().splitlines()
        assert len(hyps) == 60
    assert results["rows"][0]["speedup_vs_teacher"] == 1.0
    markdown = (work / "results.md").read_text()
    assert "| model | test set | sacreBLEU |" in markdown and "sacreBLEU signature" in markdown
    speed_log = (work / "speed" / "teacher.test.gen").read_text()
    assert "Translated 60 sentences" in speed_log  # nothing dropped from the test set


def test_rerun_skips_finished_stages_and_names_unknown_ones(recipe_run):
    work, env, _ = recipe_run
    proc = run_recipe("examples/wmt16_en_ro/run.sh", env=env)
    assert proc.stdout.count("skip ") == len(STAGES)
    proc = run_recipe("examples/wmt16_en_ro/run.sh", "distill", env=env, check=False)
    assert proc.returncode != 0 and "unknown stage 'distill'" in proc.stderr
    assert "prepare teacher kd_data" in proc.stderr


def test_update_counts_without_a_final_save_are_refused_before_any_work(tmp_path):
    env = dict(TINY, WORK=str(tmp_path), TEACHER_UPDATES="25")
    proc = run_recipe("examples/wmt16_en_ro/run.sh", env=env, check=False)
    assert proc.returncode != 0
    assert "TEACHER_UPDATES=25 is not a multiple of SAVE_INTERVAL_UPDATES=10" in proc.stderr
    assert "start prepare" not in proc.stdout and not (tmp_path / "done").exists()


def test_pair_scripts_configure_the_shared_pipeline(tmp_path):
    env = {"WORK": str(tmp_path), "NUM_GPUS": "2"}
    cfg = {}
    for pair in ("wmt16_en_ro", "wmt14_en_de"):
        out = run_recipe(f"examples/{pair}/run.sh", "config", env=env).stdout
        cfg[pair] = dict(line.split("=", 1) for line in out.splitlines())
    assert cfg["wmt16_en_ro"]["TGT"] == "ro" and cfg["wmt14_en_de"]["TGT"] == "de"
    assert cfg["wmt14_en_de"]["BLEU_CONVENTION"] == "ende-compound"
    assert cfg["wmt14_en_de"]["UPDATE_FREQ"] == "4"  # 8 GPUs x 4096 tokens on 2 GPUs
    assert cfg["wmt16_en_ro"]["FP16"] == "1" and cfg["wmt16_en_ro"]["LR"] == "7e-4"
    proc = run_recipe("examples/nist12_zh_en/run.sh", "config", env=env, check=False)
    assert proc.returncode != 0 and "NIST_DIR" in proc.stderr
    out = run_recipe("examples/nist12_zh_en/run.sh", "config",
                     env=dict(env, NIST_DIR=str(tmp_path))).stdout
    assert "TEST_SETS=mt02 mt03 mt04 mt05 mt08" in out and "VALID_SET=mt06" in out
    assert "TOKENIZE_SRC=none" in out and "BLEU_CONVENTION=moses-lc" in out


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
    with pytest.raises(EvaluationError, match="complete stdout"):
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
