"""The method study (examples/bible_es_en/study.sh and study.py): a tiny study on the
reversed pair (en->es) through the shared pipeline, budgets read off one run per arm, the
part records and the report; and the pieces study.py reads (saves, the training wall-clock)."""

import json
import sys

import pytest
import torch

from conftest import REPO, bible_subset
from test_recipes import run_recipe

sys.path.insert(0, str(REPO / "examples" / "bible_es_en"))
import study  # noqa: E402

#: Tiny sizes; the study's own settings otherwise. Seed 1 trains every arm to 25 updates
#: (WD: phase 1 10 + phase 2 15), saving every 5, and reads budget 20 off those runs; part
#: variants trains the variants of WD slice so (long phase 1: 15 + 10).
TINY = dict(
    SRC="en", TGT="es", PAIR_NAME="tiny en-es", WORKERS="1", BPE_MERGES="30", BPE_VOCAB_THRESHOLD="1",
    TEACHER_LAYERS="2", TEACHER_DIM="32", TEACHER_FFN="64", TEACHER_HEADS="4",
    STUDENT_DEC_LAYERS="1", STUDENT_DEC_DIM="16", STUDENT_DEC_FFN="32", STUDENT_DEC_HEADS="4",
    MAX_TOKENS="1000", LR="5e-3", WARMUP="20", PHASE2_WARMUP="5", TEACHER_UPDATES="30",
    TEACHER_AVERAGE="updates", AVG_LAST="2", SAVE_INTERVAL_UPDATES="5", PHASE1="10", PHASE1_LONG="15", LONG="25",
    LONG_BUDGETS="20", PARTS="base seed1 variants", KD_MAX_TOKENS="2000", EVAL_BATCH_SIZE="64",
    GENERATE_EXTRA="--max-len-a 0 --max-len-b 20", TRAIN_EXTRA="--validate-interval 100",
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    raw = bible_subset(base, train=300, max_words=20, valid=40, test=30, pair="en-es")
    env = dict(TINY, RAW_DIR=str(raw), STUDY=str(base / "runs"), OUT=str(base / "out"))
    proc = run_recipe("examples/bible_es_en/study.sh", env=env)
    return base, env, proc


def test_study_scores_every_arm_at_every_budget_in_the_runs_target_language(tiny_study):
    base, _, proc = tiny_study
    out = base / "out"
    assert {p.name for p in out.iterdir()} == {"base.json", "seed1.json", "variants.json", "results.md",
                                               "results.json", "results.png"}
    part = json.loads((out / "seed1.json").read_text())
    assert part["target_lang"] == "es" and part["seed"] == 1 and part["sentences"] == 30
    # every arm at 20 updates; the WD arms also at the end of phase 1 (materialised)
    assert {(m["arm"], m["budget"]) for m in part["models"]} == {
        ("kd", 20), ("sel", 20), ("wd", 10), ("wd", 20), ("wd_slice", 10), ("wd_slice", 20)}
    for m in part["models"]:
        assert m["train_wall_s"] is not None and m["train_wall_s"] >= 0
        assert 0 <= m["sacrebleu"] <= 100 and m["chrf"] > 0
    # WD's wall-clock counts phase 1 and the materialisation (timestamps: whole seconds)
    wall = {(m["arm"], m["budget"]): m["train_wall_s"] for m in part["models"]}
    assert wall["wd", 20] >= wall["wd", 10] >= part["stage_times"]["wd"]["materialize"]
    # every arm against KD and against Selection + KD at the same budget
    pairs = {(c["arm"], c["base"], c["budget"]) for c in part["comparisons"]}
    assert pairs == {("sel", "kd", 20), ("wd", "kd", 20), ("wd", "sel", 20), ("wd_slice", "kd", 20),
                     ("wd_slice", "sel", 20), ("kd", "sel", 20)}
    assert set(part["stage_times"]) == {"kd", "sel", "wd", "wd_slice"}
    assert "TEACHER_LAYERS=2" in part["settings"] and "SEED=1" in part["settings"]
    report = json.loads((out / "results.json").read_text())
    assert report["teacher"]["target_lang"] == "es"
    variants = json.loads((out / "variants.json").read_text())
    assert {(r["arm"], r["budget"]) for r in report["rows"]} == {
        (m["arm"], m["budget"]) for p in (part, variants) for m in p["models"]}
    md = (out / "results.md").read_text()
    assert "| 20 | WD faithful | 1 |" in md and "s1: " in md
    assert "Seeds: 1;" in md and "WD slice, long phase 1: 15, then phase-2 saves" in md
    assert (out / "results.png").stat().st_size > 10_000


def test_variants_of_wd_slice_are_scored_against_the_kd_and_selection_of_their_seed(tiny_study):
    base, _, _ = tiny_study
    variants = json.loads((base / "out" / "variants.json").read_text())
    seed1 = json.loads((base / "out" / "seed1.json").read_text())
    assert variants["seed"] == 1 and variants["phase1"] == {"wd_slice_long": 15, "wd_slice_word": 10}
    assert {(m["arm"], m["budget"]) for m in variants["models"]} == {
        ("wd_slice_long", 15), ("wd_slice_long", 20), ("wd_slice_word", 10), ("wd_slice_word", 20)}
    assert {(c["arm"], c["base"], c["budget"]) for c in variants["comparisons"]} == {
        (arm, b, 20) for arm in ("wd_slice_long", "wd_slice_word") for b in ("kd", "sel")}
    # the bases are seed 1's own kd and sel (scored by seed 1's evaluate run)
    bleu = {(m["arm"], m["budget"]): m["sacrebleu"] for p in (seed1, variants) for m in p["models"]}
    for c in variants["comparisons"]:
        assert c["minus_base"] == pytest.approx(bleu[c["arm"], 20] - bleu[c["base"], 20], abs=0.02)
    runs = base / "runs"
    word = (runs / "seed1-wd_slice_word/logs/wd_phase1.log").read_text()
    assert "kd_label_smoothed_cross_entropy" in word and "'kd_alpha': 0.5" in word
    assert "kd_label_smoothed_cross_entropy" not in (runs / "seed1-wd_slice_long/logs/wd_phase1.log").read_text()
    assert "kd_label_smoothed_cross_entropy" not in (runs / "seed1-wd_slice_word/logs/wd_phase2.log").read_text()


def test_budget_checkpoint_is_the_average_of_its_two_last_saves(tiny_study):
    base, _, _ = tiny_study
    runs = base / "runs"
    average = torch.load(runs / "seed1-eval/budgets/kd_20.pt", weights_only=True)["model"]
    found = study.saves_by_update(str(runs / "seed1-kd/kd_student"))
    saves = [torch.load(found[update], weights_only=True)["model"] for update in (15, 20)]
    for name, tensor in average.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (saves[0][name].double() + saves[1][name].double()).div(2).to(tensor.dtype))
    # WD at 20 = phase-2 saves at 5 and 10; WD at 10 = the materialised phase-1 student
    assert study.budget_checkpoints("wd", str(runs / "seed1-wd"), 10, 10, 5) == [str(runs / "seed1-wd/wd_phase2/init.pt")]
    assert [p.rsplit("_", 1)[1] for p in study.budget_checkpoints("wd", str(runs / "seed1-wd"), 20, 10, 5)] == ["5.pt", "10.pt"]
    # the long phase 1 (15 updates) leaves one phase-2 save for budget 20, none for 10
    assert study.phase1_updates(str(runs / "seed1-wd_slice_long")) == 15
    assert study.budget_checkpoints("wd_slice_long", str(runs / "seed1-wd_slice_long"), 10, 15, 5) == []
    assert [p.rsplit("_", 1)[1] for p in study.budget_checkpoints("wd_slice_long", str(runs / "seed1-wd_slice_long"), 20, 15, 5)] == ["5.pt"]


def test_finished_parts_are_reused_and_a_missing_save_is_named(tiny_study):
    base, env, _ = tiny_study
    before = (base / "out" / "seed1.json").stat().st_mtime_ns
    proc = run_recipe("examples/bible_es_en/study.sh", env=env)
    assert all(f"part {p}: reused" in proc.stdout for p in ("base", "seed1", "variants"))
    assert (base / "out" / "seed1.json").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match=r"no save at update\(s\) \[30, 35\].*--keep-interval-updates -1"):
        study.budget_checkpoints("kd", str(base / "runs" / "seed1-kd"), 35, 0, 5)
    proc = run_recipe("examples/bible_es_en/study.sh", "seed", env=env, check=False)
    assert proc.returncode == 1 and "unknown part 'seed'" in proc.stderr


def test_wall_at_adds_up_the_segments_of_a_resumed_run(tmp_path):
    log = tmp_path / "stage.log"
    inner = "2026-12-01 {} | INFO | train_inner | epoch 001:  {} / 524 loss=9.1, num_updates={}, lr=0.0005, wall={}\n"
    log.write_text(
        "2026-12-01 10:00:00 | INFO | fairseq.trainer | No existing checkpoint found /x/checkpoint_last.pt\n"
        + inner.format("10:01:15", 200, 200, 75) + inner.format("10:02:40", 400, 400, 160)
        + inner.format("10:04:00", 600, 600, 240)
        # killed after update 600; resumed from the save at 400; fairseq's wall reads 0 from then on
        + "2026-12-01 11:00:00 | INFO | fairseq.trainer | Loaded checkpoint /x/checkpoint_last.pt (epoch 1 @ 400 updates)\n"
        + inner.format("11:01:30", 600, 600, 0)
        + "2026-12-01 11:02:10 | INFO | train | epoch 001 | loss 8.8 | num_updates 700 | lr 0.0007 | wall 0\n")
    assert study.wall_at(str(log), 200) == 75 and study.wall_at(str(log), 400) == 160
    assert study.wall_at(str(log), 600) == 160 + 90 and study.wall_at(str(log), 700) == 160 + 130
    assert study.wall_at(str(log), 2000) is None


def test_differences_over_seeds_get_a_t_interval():
    seeds = study.over_seeds([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert seeds["mean"] == 2.0 and seeds["n"] == 3
    assert seeds["ci95"] == pytest.approx([2.0 - 4.3027 / 3 ** 0.5, 2.0 + 4.3027 / 3 ** 0.5], abs=1e-3)
    assert study.over_seeds([0.5]) == {"mean": 0.5, "n": 1, "ci95": None}
