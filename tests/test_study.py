"""The method study (examples/bible_es_en/study.sh and study.py): a tiny study v2 on the
reversed pair (en->es) through the shared pipeline, budgets read off one run per arm, every arm
on one learning-rate curve, the part records and the report; and the pieces study.py reads (saves,
the training wall-clock)."""

import json
import sys

import pytest
import torch

from conftest import REPO, bible_subset
from test_recipes import run_recipe

sys.path.insert(0, str(REPO / "examples" / "bible_es_en"))
import study  # noqa: E402

#: Tiny sizes; the study's own settings otherwise. Seed 1 trains every arm to 25 updates
#: (WD: phase 1 10 + phase 2 15), saving every 5, and reads budgets 0 (the starts) and 20 off
#: those runs; part restart trains WD slice with the authors' restart, part lr1e-2 the
#: learning-rate check at 1e-2 (the study's LR here: 5e-3).
TINY = dict(
    SRC="en", TGT="es", PAIR_NAME="tiny en-es", WORKERS="1", BPE_MERGES="30", BPE_VOCAB_THRESHOLD="1",
    TEACHER_LAYERS="2", TEACHER_DIM="32", TEACHER_FFN="64", TEACHER_HEADS="4",
    STUDENT_DEC_LAYERS="1", STUDENT_DEC_DIM="16", STUDENT_DEC_FFN="32", STUDENT_DEC_HEADS="4",
    MAX_TOKENS="1000", LR="5e-3", WARMUP="20", PHASE2_WARMUP="5", TEACHER_UPDATES="30",
    TEACHER_AVERAGE="updates", AVG_LAST="2", SAVE_INTERVAL_UPDATES="5", PHASE1="10", LONG="25",
    BUDGETS="0 20", PARTS="base costs seed1 restart lr1e-2", KD_MAX_TOKENS="2000", EVAL_BATCH_SIZE="64",
    GENERATE_EXTRA="--max-len-a 0 --max-len-b 20", TRAIN_EXTRA="--validate-interval 100",
)
ARMS = ("kd", "sel", "slice_kd", "wd", "wd_slice")


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
    assert {p.name for p in out.iterdir()} == {"base.json", "costs.json", "seed1.json", "restart.json", "lr1e-2.json",
                                               "results.md", "results.json", "results.png"}
    # one queue: every part's arms are queued before the first part is scored
    log = proc.stdout
    assert max(log.index(f"part {p}: queued") for p in ("seed1", "restart", "lr1e-2")) < log.index(
        "part seed1: arms trained, scoring") < log.index("part restart: arms trained, scoring")
    part = json.loads((out / "seed1.json").read_text())
    assert part["target_lang"] == "es" and part["seed"] == 1 and part["sentences"] == 30
    # every arm at 20 updates and, but KD, at its start; the WD arms also at the end of phase 1
    assert {(m["arm"], m["budget"]) for m in part["models"]} == {
        ("kd", 20), *((arm, budget) for arm in ARMS[1:] for budget in (0, 20)), ("wd", 10), ("wd_slice", 10)}
    for m in part["models"]:
        assert m["train_wall_s"] is not None and m["train_wall_s"] >= 0
        assert 0 <= m["sacrebleu"] <= 100 and m["chrf"] > 0
    # WD's wall-clock counts phase 1 and the materialisation (timestamps: whole seconds)
    wall = {(m["arm"], m["budget"]): m["train_wall_s"] for m in part["models"]}
    assert wall["wd", 20] >= wall["wd", 10] >= part["stage_times"]["wd"]["materialize"]
    assert wall["sel", 0] == 0
    # every arm against KD and against Selection + KD at the same budget (KD has no start)
    pairs = {(c["arm"], c["base"], c["budget"]) for c in part["comparisons"]}
    assert pairs == {*((arm, "sel", 0) for arm in ("slice_kd", "wd", "wd_slice")),
                     *((arm, b, 20) for arm in ARMS for b in ("kd", "sel") if arm != b)}
    assert set(part["stage_times"]) == set(ARMS)
    assert "TEACHER_LAYERS=2" in part["settings"] and "SEED=1" in part["settings"]
    assert part["lr"] == 5e-3 and not part["lr_check"]
    # every record names the teacher it trained from: base's
    teacher = study.teacher_sha256(str(base / "runs" / "base"))
    assert {json.loads(p.read_text())["teacher_sha256"] for p in out.glob("*.json")
            if p.name != "results.json"} == {teacher}
    report = json.loads((out / "results.json").read_text())
    assert report["teacher"]["target_lang"] == "es"
    restart = json.loads((out / "restart.json").read_text())
    assert {(r["arm"], r["budget"]) for r in report["rows"]} == {
        (m["arm"], m["budget"]) for p in (part, restart) for m in p["models"]}
    md = (out / "results.md").read_text()
    assert "| 20 | WD faithful | 1 |" in md and "| 0 | Slice start + KD, no generator | 1 |" in md and "s1: " in md
    assert "Seeds: 1;" in md and "Learning-rate check: sacreBLEU at 20 updates, seed 1" in md
    # the time axis: updates x the costs part's CPU seconds per update of their kind
    costs = json.loads((out / "costs.json").read_text())
    per = {kind: c["cpu_s"] for kind, c in costs["per_update"].items()}
    assert set(per) == {"plain", "phase1_faithful", "phase1_slice"} and min(per.values()) > 0
    assert "--arch wd_transformer" in costs["commands"]["phase1_slice"] and "--wd-init slice" in costs["commands"]["phase1_slice"]
    assert "--arch transformer" in costs["commands"]["plain"] and costs["steps"] == 40
    compute = {(r["arm"], r["budget"]): r["compute_min"] * 60 for r in report["rows"]}
    assert compute["sel", 20] == pytest.approx(20 * per["plain"], abs=3)  # (rounded to 0.1 min)
    materialize = part["stage_times"]["wd_slice"]["materialize"]
    assert compute["wd_slice", 20] == pytest.approx(10 * per["phase1_slice"] + materialize + 10 * per["plain"], abs=3)
    assert compute["wd", 0] == 0 and "update compute: updates x the CPU seconds" in md
    assert (out / "results.png").stat().st_size > 10_000


def test_every_arm_trains_on_one_learning_rate_curve_from_its_start(tiny_study):
    """WD's phase 2 continues phase 1's curve (the KD arms' curve); slice_kd starts where WD
    slice starts (its step-0 student) and trains without a generator."""
    runs = tiny_study[0] / "runs"
    curve = "'warmup_updates': 20, 'warmup_init_lr': 1e-07, 'lr': [0.005]"
    phase2 = (runs / "seed1-wd_slice/logs/wd_phase2.log").read_text()
    assert f"'lr_scheduler': {{'_name': 'inverse_sqrt_offset', {curve}, 'update_offset': 10}}" in phase2
    for arm, stage in (("wd_slice", "wd_phase1"), ("kd", "kd_student"), ("sel", "sel_student"),
                       ("slice_kd", "sel_student")):
        log = (runs / f"seed1-{arm}/logs/{stage}.log").read_text()
        assert f"'lr_scheduler': {{'_name': 'inverse_sqrt', {curve}}}" in log, arm
    control = (runs / "seed1-slice_kd/logs/sel_student.log").read_text()
    assert "model: TransformerModel" in control and "WDTransformerModel" not in control
    start = torch.load(runs / "seed1-slice_kd/sel_student/init.pt", weights_only=True)["model"]
    wd_start = torch.load(runs / "seed1-wd_slice/step0.pt", weights_only=True)["model"]
    assert start.keys() == wd_start.keys() and all(torch.equal(start[k], wd_start[k]) for k in start)
    faithful = torch.load(runs / "seed1-wd/step0.pt", weights_only=True)["model"]
    assert not torch.equal(faithful["decoder.layers.0.fc1.weight"], start["decoder.layers.0.fc1.weight"])


def test_restart_and_learning_rate_check_parts(tiny_study):
    """restart: WD slice with the authors' restart, against seed 1's own kd and sel; lr1e-2:
    sel and the WD arms at another peak rate, in the report's check table beside seed 1's."""
    base, _, _ = tiny_study
    restart = json.loads((base / "out" / "restart.json").read_text())
    seed1 = json.loads((base / "out" / "seed1.json").read_text())
    assert restart["seed"] == 1 and restart["phase1"] == {"wd_slice_restart": 10}
    assert {(c["arm"], c["base"], c["budget"]) for c in restart["comparisons"]} == {
        ("wd_slice_restart", "sel", 0), ("wd_slice_restart", "kd", 20), ("wd_slice_restart", "sel", 20)}
    bleu = {(m["arm"], m["budget"]): m["sacrebleu"] for p in (seed1, restart) for m in p["models"]}
    for c in restart["comparisons"]:
        assert c["minus_base"] == pytest.approx(bleu[c["arm"], c["budget"]] - bleu[c["base"], c["budget"]], abs=0.02)
    phase2 = (base / "runs/seed1-wd_slice_restart/logs/wd_phase2.log").read_text()
    assert "'lr_scheduler': {'_name': 'inverse_sqrt', 'warmup_updates': 5," in phase2
    check = json.loads((base / "out" / "lr1e-2.json").read_text())
    assert check["lr_check"] and check["lr"] == 1e-2 and "LR=1e-2" in check["settings"]
    assert {(m["arm"], m["budget"]) for m in check["models"]} == {  # the starts are seed 1's
        ("sel", 20), ("wd", 10), ("wd", 20), ("wd_slice", 10), ("wd_slice", 20)}
    assert "'lr': [0.01]}" in (base / "runs/lr1e-2-seed1-sel/logs/sel_student.log").read_text()
    rows = json.loads((base / "out" / "results.json").read_text())["learning_rate_check"]
    assert [r["arm"] for r in rows] == ["sel", "wd", "wd_slice"]
    for row in rows:
        assert set(row["sacrebleu_by_lr"]) == {"0.005", "0.01"} and row["budget"] == 20
        assert row["sacrebleu_by_lr"]["0.005"] == bleu[row["arm"], 20]


def test_budget_checkpoint_is_the_average_of_its_two_last_saves(tiny_study):
    base, _, _ = tiny_study
    runs = base / "runs"
    average = torch.load(runs / "seed1-eval/budgets/kd_20.pt", weights_only=True)["model"]
    found = study.saves_by_update(str(runs / "seed1-kd/kd_student"))
    saves = [torch.load(found[update], weights_only=True)["model"] for update in (15, 20)]
    for name, tensor in average.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (saves[0][name].double() + saves[1][name].double()).div(2).to(tensor.dtype))
    # WD at 20 = phase-2 saves at 5 and 10; WD at 10 = the materialised phase-1 student; at 0
    # its start; KD has none
    assert study.budget_checkpoints("wd", str(runs / "seed1-wd"), 10, 10, 5) == [str(runs / "seed1-wd/wd_phase2/init.pt")]
    assert [p.rsplit("_", 1)[1] for p in study.budget_checkpoints("wd", str(runs / "seed1-wd"), 20, 10, 5)] == ["5.pt", "10.pt"]
    assert study.budget_checkpoints("wd", str(runs / "seed1-wd"), 0, 10, 5) == [str(runs / "seed1-wd/step0.pt")]
    assert study.budget_checkpoints("sel", str(runs / "seed1-sel"), 0, 0, 5) == [str(runs / "seed1-sel/sel_student/init.pt")]
    assert study.budget_checkpoints("kd", str(runs / "seed1-kd"), 0, 0, 5) == []
    assert study.budget_checkpoints("wd", str(runs / "seed1-wd"), 5, 10, 5) == []


def test_finished_parts_are_reused_and_a_missing_save_is_named(tiny_study):
    base, env, _ = tiny_study
    before = (base / "out" / "seed1.json").stat().st_mtime_ns
    proc = run_recipe("examples/bible_es_en/study.sh", env=env)
    assert all(f"part {p}: reused" in proc.stdout for p in ("base", "seed1", "restart", "lr1e-2"))
    assert (base / "out" / "seed1.json").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match=r"no save at update\(s\) \[30, 35\].*--keep-interval-updates -1"):
        study.budget_checkpoints("kd", str(base / "runs" / "seed1-kd"), 35, 0, 5)
    proc = run_recipe("examples/bible_es_en/study.sh", "seed", env=env, check=False)
    assert proc.returncode == 1 and "unknown part 'seed'" in proc.stderr


def test_parts_of_another_teacher_are_refused(tiny_study, tmp_path):
    """A seed part needs base's runs on this machine; the report mixes no two teachers."""
    base, env, _ = tiny_study
    proc = run_recipe("examples/bible_es_en/study.sh", "seed2",
                      env=dict(env, STUDY=str(tmp_path / "elsewhere"), OUT=str(tmp_path / "out")), check=False)
    assert proc.returncode == 1 and "part seed2: needs base's teacher and KD data in" in proc.stdout
    assert not (tmp_path / "elsewhere" / "seed2-kd").exists()
    other = json.loads((base / "out" / "seed1.json").read_text())
    other["teacher_sha256"] = "0" * 64
    (tmp_path / "seed1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"seed1.json trained from another teacher than base's"):
        study.main(["report", "--parts", str(base / "out" / "base.json"), str(tmp_path / "seed1.json"),
                    "--out-prefix", str(tmp_path / "results")])


def test_a_failed_arm_stops_the_lanes_and_restart_waits_for_its_seed(tiny_study, tmp_path):
    base, env, _ = tiny_study
    env = dict(env, OUT=str(tmp_path / "out"), SEED_ARMS="sel kd", STUDENT_DEC_HEADS="3", POLL_SECONDS="1")
    proc = run_recipe("examples/bible_es_en/study.sh", "seed8", "seed9", env=env, check=False)
    assert proc.returncode == 1 and "part seed8: an arm failed" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "seed8.json").exists()
    assert not any((base / "runs" / f"seed9-{arm}").exists() for arm in ("sel", "kd"))  # never started
    proc = run_recipe("examples/bible_es_en/study.sh", "restart", env=dict(env, VARIANT_SEED="7"), check=False)
    assert proc.returncode == 1 and "part restart: is scored against part seed7's kd and sel" in proc.stdout
    assert not (base / "runs" / "seed7-wd_slice_restart").exists()


def test_a_seed_part_trains_the_arms_it_is_given(tiny_study, tmp_path):
    """SEED_ARMS and BUDGETS choose a part's arms and scores (the second scale point's way:
    SCALE=2 sets them, with the CPU benchmark's teacher and student shapes)."""
    base, env, _ = tiny_study
    env = dict(env, OUT=str(tmp_path / "out"), SEED_ARMS="sel", BUDGETS="20")
    run_recipe("examples/bible_es_en/study.sh", "seed2", env=env)
    part = json.loads((tmp_path / "out" / "seed2.json").read_text())
    assert [(m["arm"], m["budget"]) for m in part["models"]] == [("sel", 20)] and part["seed"] == 2
    assert not (base / "runs" / "seed2-kd").exists()
    scale2 = run_recipe("examples/bible_es_en/study.sh", "settings", env={"SCALE": "2"}).stdout
    for setting in ("TEACHER_LAYERS=4", "TEACHER_DIM=256", "TEACHER_FFN=1024", "STUDENT_DEC_DIM=128",
                    "STUDENT_DEC_FFN=512", "SEED_ARMS=sel wd_slice", "BUDGETS=0 6400", "PARTS=base costs seed1 seed2 seed3"):
        assert setting + "\n" in scale2
    assert scale2.rstrip().endswith("examples/bible_es_en/study/v2-scale2")


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
