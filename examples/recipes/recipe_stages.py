#!/usr/bin/env python3
"""The recipe's stages (``pipeline.sh`` documents each stage and setting) as
``wd_fairseq.stages`` stages: the machinery of ``wd-distill``, with its command builders
(``wd_fairseq/commands.py``); ``prepare`` is ``recipe_prepare.py``'s.

    recipe_stages.py plan < KEY=VALUE lines         every command of every stage
    recipe_stages.py run [--force] STAGE... < KEY=VALUE lines

The KEY=VALUE lines are ``pipeline.sh``'s resolved settings. ``run`` keeps the recipe's
contract: a stage marked ``WORK/done/STAGE`` is skipped unless ``--force`` (``FORCE=1``);
one that stopped halfway resumes (``fairseq-train`` from ``checkpoint_last.pt``,
``wd-kd-data`` from its shards); every stage logs to ``WORK/logs/STAGE.log`` and to stdout.
A stage is built just before it runs, from what the stages before it wrote (phase 2 reads
the materialised student's flags).
"""

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import recipe_tools
from recipe_prepare import prepare_stage, references, require_files
from wd_fairseq import evaluation
from wd_fairseq.checkpoints import phase2_flags
from wd_fairseq.cli import run_cli
from wd_fairseq.commands import generate_command, kd_data_command, learning_rate_flags, score_command
from wd_fairseq.disk_space import human, require_free_space
from wd_fairseq.distill_data import link_data
from wd_fairseq.files import write_atomic
from wd_fairseq.stages import Command, Stage, describe, run_action
from wd_fairseq.teacher import WDSetupError

#: The stages of a full run, in order (sel_student is optional, run by name).
STAGES = ("prepare", "teacher", "kd_data", "kd_student", "wd_phase1", "materialize", "wd_phase2", "evaluate", "speed")


class Recipe:
    """A run's settings (``pipeline.sh``'s, by name) and the paths of its work directory."""

    def __init__(self, settings: Dict[str, str], plan: bool = False):
        self.s, self.plan = settings, plan
        self.work = settings["WORK"]
        self.data, self.data_kd = self.path("data-bin"), self.path("data-bin-kd")
        self.teacher = self.path("teacher", "checkpoint_avg.pt")
        self.wd_init = self.path("wd_phase2", "init.pt")
        names = ["teacher", "kd_student", "wd_phase1", "wd_student", "sel_student"]
        checkpoints = [self.teacher, self.path("kd_student", "checkpoint_avg.pt"), self.wd_init,
                       self.path("wd_phase2", "checkpoint_avg.pt"), self.path("sel_student", "checkpoint_avg.pt")]
        extra = [entry.split("=", 1) for entry in settings["EXTRA_MODELS"].split()]  # (pipeline.sh checked them)
        self.models = dict(zip(names + [n for n, _ in extra], checkpoints + [c for _, c in extra]))
        self.evaluated = [name for name in self.models if name in settings["EVAL_MODELS"].split()]
        self.test_sets = settings["TEST_SETS"].split()

    def __repr__(self) -> str:  # (how a stage's log names the Python steps given it)
        return f"Recipe({self.work!r})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def words(self, name: str) -> List[str]:
        """A setting of extra flags, split on whitespace as on a command line."""
        return self.s[name].split()

    def device_flags(self) -> List[str]:
        return (["--fp16"] if self.s["FP16"] == "1" else []) + (["--cpu"] if self.s["CPU"] == "1" else [])

    @property
    def direction(self):
        return self.s["SRC"], self.s["TGT"]


# -- training ---------------------------------------------------------------------------------

def retention_flags(rule: str, last: str) -> List[str]:
    """The checkpoints a stage keeps (fairseq deletes older ones as it saves), by what is
    averaged at its end: ``epochs``: the last ``last`` epoch ends; ``updates``: the last
    ``last`` saves (a save on an epoch end is named by its epoch); ``none``: only
    checkpoint_last.pt (resuming) and, with validation, checkpoint_best.pt."""
    return {"epochs": ["--keep-last-epochs", last, "--keep-interval-updates", "1"],
            "updates": ["--keep-last-epochs", last, "--keep-interval-updates", last],
            "none": ["--no-epoch-checkpoints", "--keep-interval-updates", "1"]}[rule]


def training(r: Recipe, data: str, model: List[str], updates: str, save_dir: str, *, rule: str,
             criterion: str = "ls", curve: Optional[List[str]] = None, last: str = "") -> List:
    """The actions of one training run: its batch line, then ``fairseq-train`` (one process)
    or ``torchrun`` with one ``wd-train`` per GPU (per gloo process with CPU=1).

    ``--distributed-world-size`` is the process count the update frequency was computed
    from, so fairseq cannot train on more (or fewer) GPUs than the batch assumes.
    ``--data-buffer-size 0``: no fairseq prefetch thread (one left collating when the run
    stops mid-epoch aborts the exit after the last save, exit 134); prefetching stays with
    the DataLoader worker (``--num-workers 1``). ``criterion``: ``ls`` (label-smoothed CE),
    ``kd`` (word-level KD with KD_ALPHA != 0, teacher from ``--teacher-path``) or ``wd`` (the
    same in phase 1, whose teacher is inside the model). ``curve``: the learning-rate flags
    (default: the recipe's, LR and WARMUP); ``last``: the checkpoints ``rule`` averages
    (default: AVG_LAST)."""
    s = r.s
    flags = [*model, *(curve or learning_rate_flags(s["LR"], s["WARMUP"])),
             "--weight-decay", "0.0", "--clip-norm", "0.0", "--dropout", s["DROPOUT"],
             "--attention-dropout", s["ATTENTION_DROPOUT"], "--activation-dropout", s["ACTIVATION_DROPOUT"],
             "--max-tokens", s["MAX_TOKENS"], "--update-freq", s["UPDATE_FREQ"],
             "--distributed-world-size", s["NUM_GPUS"], "--seed", s["SEED"],
             "--save-interval-updates", s["SAVE_INTERVAL_UPDATES"], *retention_flags(rule, last or s["AVG_LAST"]),
             "--no-progress-bar", "--log-format", "simple", "--log-interval", "100", "--num-workers", "1",
             "--data-buffer-size", "0", "--skip-invalid-size-inputs-valid-test", *r.device_flags(),
             *r.words("TRAIN_EXTRA")]
    if criterion != "ls" and float(s["KD_ALPHA"]) != 0:
        flags += ["--criterion", "kd_label_smoothed_cross_entropy", "--label-smoothing", s["LABEL_SMOOTHING"],
                  "--kd-alpha", s["KD_ALPHA"], "--kd-temperature", s["KD_TEMPERATURE"]]
        if criterion == "kd":
            flags += ["--user-dir", user_dir(), "--teacher-path", r.teacher]
    else:
        flags += ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", s["LABEL_SMOOTHING"]]
    flags += ["--max-update", updates, "--save-dir", save_dir]
    n = int(s["NUM_GPUS"])
    launch = ["fairseq-train"] if n == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(n),
                                               "--no-python", "wd-train"]
    batch = (f"batch: {n} GPU process(es) x {s['MAX_TOKENS']} tokens x update-freq {s['UPDATE_FREQ']} = "
             f"{s['EFFECTIVE_TOKENS']} tokens per update (target BATCH_TOKENS={s['BATCH_TOKENS']}); dropout "
             f"{s['DROPOUT']}, attention {s['ATTENTION_DROPOUT']}, activation {s['ACTIVATION_DROPOUT']}")
    return [functools.partial(say, batch), Command([*launch, data, *flags])]


def average(r: Recipe, directory: str, rule: str, last: str = "") -> Command:
    """The mean of the stage's last checkpoints by ``rule`` into DIR/checkpoint_avg.pt."""
    return Command([sys.executable, recipe_tools.__file__, "average", "--dir", directory, "--rule", rule,
                    "--last", last or r.s["AVG_LAST"], "--out", os.path.join(directory, "checkpoint_avg.pt")])


def shape(r: Recipe, decoder: str) -> List[str]:
    """The shape flags: the teacher's encoder (the students' too, as in the paper) and the
    decoder of ``decoder``: TEACHER or STUDENT_DEC (its LAYERS, DIM, FFN, HEADS)."""
    s = r.s
    return [f for side, key in (("encoder", "TEACHER"), ("decoder", decoder)) for f in (
        f"--{side}-layers", s[f"{key}_LAYERS"], f"--{side}-embed-dim", s[f"{key}_DIM"],
        f"--{side}-ffn-embed-dim", s[f"{key}_FFN"], f"--{side}-attention-heads", s[f"{key}_HEADS"])]


def student_decoder(r: Recipe) -> List[str]:
    return shape(r, "STUDENT_DEC")[8:]


def disk_check(r: Recipe, stage: str, directory: str) -> functools.partial:
    return functools.partial(check_disk, r, stage, directory)


def check_disk(r: Recipe, stage: str, directory: str) -> None:
    """Refuse to start a training stage whose checkpoints (estimate, less what its save dir
    already holds: a resumed stage) do not fit on the disk of that directory."""
    _, size, files = recipe_tools.stage_checkpoints(r.s, r.data)[stage]
    held = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith(".pt")) if os.path.isdir(directory) else 0
    require_free_space(directory, size * files - held, f"the checkpoints of stage {stage} ({files} x {human(size)})",
                       "free space there, or set WORK to a bigger disk (or lower AVG_LAST); a rerun resumes the stage")


def teacher_stage(r: Recipe) -> Stage:
    rule, save = r.s["TEACHER_AVERAGE"], r.path("teacher")
    return Stage("teacher", [
        disk_check(r, "teacher", save),
        *training(r, r.data, ["--arch", "transformer", *shape(r, "TEACHER")], r.s["TEACHER_UPDATES"], save, rule=rule),
        average(r, save, rule)])


def kd_data_stage(r: Recipe) -> Stage:
    """data-bin-kd: links to every file of data-bin, plus the split train1 of wd-kd-data."""
    engine = ["--engine", r.s["KD_ENGINE"]] if r.s["KD_ENGINE"] else []
    return Stage("kd_data", [functools.partial(link_data, r.data, r.data_kd), kd_data_command(
        r.data_kd, r.teacher, r.direction, int(r.s["KD_BEAM"]), [
            "--lenpen", r.s["KD_LENPEN"], "--max-tokens", r.s["KD_MAX_TOKENS"], *engine, *r.device_flags(),
            *r.words("KD_EXTRA")])])


def student_stage(r: Recipe, name: str, init: List = ()) -> Stage:
    """KD (``kd_student``) or Selection + KD (``sel_student``, after ``init``): the student's
    shape on original + KD data (``--upsample-primary 1``: fairseq 0.12's default -1 breaks
    the concatenation of train and train1)."""
    rule, save = r.s["STUDENT_AVERAGE"], r.path(name)
    start = ["--finetune-from-model", os.path.join(save, "init.pt")] if init else []
    model = ["--arch", "transformer", *shape(r, "STUDENT_DEC"), "--upsample-primary", "1", *start]
    return Stage(name, [*init, disk_check(r, "kd_student", save),
                        *training(r, r.data_kd, model, r.s["KD_UPDATES"], save, rule=rule, criterion="kd"),
                        average(r, save, rule)])


def selection_flags(r: Recipe) -> List[str]:
    if r.s["SEL_INIT"] == "selection":
        return ["--layers", r.s["SEL_LAYERS"], "--dims", r.s["SEL_DIMS"]]
    return ["--init", r.s["SEL_INIT"], "--seed", r.s["SEED"]]


def sel_student_stage(r: Recipe) -> Stage:
    """Selection + KD: kd_student's training from wd-init-student's selection of the teacher
    (fairseq resumes from checkpoint_last.pt once there is one, and ignores init.pt then)."""
    save = r.path("sel_student")
    init = [functools.partial(os.makedirs, save, exist_ok=True),
            Command(["wd-init-student", r.teacher, os.path.join(save, "init.pt"), "--data", r.data,
                     *student_decoder(r), *selection_flags(r)], creates=os.path.join(save, "init.pt"))]
    return student_stage(r, "sel_student", init)


def wd_phase1_stage(r: Recipe) -> Stage:
    save = r.path("wd_phase1")
    model = ["--user-dir", user_dir(), "--arch", "wd_transformer", "--teacher-path", r.teacher,
             *student_decoder(r), "--wd-init", r.s["WD_INIT"], "--upsample-primary", "1"]
    return Stage("wd_phase1", [
        disk_check(r, "wd_phase1", save),
        *training(r, r.data_kd, model, r.s["PHASE1_UPDATES"], save, rule="none", criterion="wd")])


def materialize_stage(r: Recipe) -> Stage:
    phase2 = r.path("wd_phase2")
    return Stage("materialize", [
        functools.partial(os.makedirs, phase2, exist_ok=True), disk_check(r, "materialize", phase2),
        Command(["wd-materialize", r.path("wd_phase1", "checkpoint_last.pt"), r.wd_init, "--data", r.data_kd]),
        functools.partial(write_phase2_flags, r.wd_init, os.path.join(phase2, "flags"))])


def write_phase2_flags(student: str, out: str) -> None:
    """``out``: the fairseq-train flags that rebuild the materialised ``student`` (its shape
    and dropout), one line."""
    import torch

    state = torch.load(student, map_location="cpu", weights_only=True)
    write_atomic(out, " ".join(phase2_flags(state["cfg"]["model"])) + "\n")


def wd_phase2_stage(r: Recipe) -> Stage:
    """Phase 2: the materialised student fine-tuned (fresh optimizer) on the authors' restart
    of the schedule (PHASE2_WARMUP) or, PHASE2_SCHEDULE=continue, along phase 1's curve from
    where phase 1 stopped; then its last saves averaged."""
    s, save, flags_file = r.s, r.path("wd_phase2"), r.path("wd_phase2", "flags")
    if r.plan:
        student = [f"<the student's shape and dropout from {flags_file}>"]
    else:
        with open(flags_file, encoding="utf-8") as f:
            student = f.read().split()
    curve = learning_rate_flags(s["LR"], s["PHASE2_WARMUP"])
    if s["PHASE2_SCHEDULE"] == "continue":
        curve = [*learning_rate_flags(s["LR"], s["WARMUP"], offset=int(s["PHASE1_UPDATES"])), "--user-dir", user_dir()]
    model = [*student, "--finetune-from-model", r.wd_init, "--upsample-primary", "1"]
    rule, last = s["STUDENT_AVERAGE"], s["PHASE2_AVG_LAST"]
    return Stage("wd_phase2", [
        disk_check(r, "wd_phase2", save),
        *training(r, r.data_kd, model, s["PHASE2_UPDATES"], save, rule=rule, curve=curve, last=last),
        average(r, save, rule, last)])


# -- evaluation ------------------------------------------------------------------------------

def generate(r: Recipe, model: str, test_set: str, out: str, batch_size: str, keep_made: bool = False) -> List:
    """``keep_made``: a rerun keeps ``out`` made by the same command from the same checkpoint."""
    checkpoint = r.models[model]
    command = generate_command(
        r.data, checkpoint, r.direction, test_set, out, int(r.s["BEAM"]),
        ["--lenpen", r.s["LENPEN"], "--num-workers", "1", *r.device_flags(), *r.words("GENERATE_EXTRA"),
         "--batch-size", batch_size])
    if keep_made:
        command = dataclasses.replace(command, creates=out, inputs=[checkpoint])
    return [functools.partial(require_checkpoint, checkpoint), command]


def require_checkpoint(path: str) -> None:
    if not os.path.isfile(path):
        raise WDSetupError(f"{path}: missing. Fix: run the stage that trains it first")


def evaluate_stage(r: Recipe) -> Stage:
    """fairseq-generate of every model of EVAL_MODELS on every test set, scored by
    wd-evaluate (sacreBLEU with signature, chrF, tokenized BLEU), then the results table.
    An interrupted or repeated evaluate keeps the translations made by the same command from
    the same checkpoint (size and mtime) and makes the rest."""
    eval_dir = r.path("eval")
    actions: List = [functools.partial(os.makedirs, eval_dir, exist_ok=True)]
    refs = {test_set: references(r, test_set, r.path("raw")) for test_set in r.test_sets}
    actions.append(functools.partial(require_files, [path for paths in refs.values() for path in paths]))
    for name in r.evaluated:
        for test_set in r.test_sets:
            prefix = os.path.join(eval_dir, f"{name}.{test_set}")
            actions += generate(r, name, test_set, prefix + ".gen", r.s["EVAL_BATCH_SIZE"], keep_made=True)
            actions.append(score_command(prefix + ".gen", refs[test_set], r.s["TGT"], name, test_set,
                                         prefix, r.s["BLEU_CONVENTION"]))
    return Stage("evaluate", actions + [functools.partial(results_table, r)])


def speed_stage(r: Recipe) -> Stage:
    """Decoding speed (SPEED_BATCH_SIZE) of every evaluated model on the first test set:
    SPEED_ROUNDS rounds, each starting one model later, so a slow spell of the machine does
    not land on one model; a record of each model's rounds, then the results table."""
    speed_dir, test_set, rounds = r.path("speed"), r.test_sets[0], int(r.s["SPEED_ROUNDS"])
    n, actions = len(r.evaluated), [functools.partial(os.makedirs, r.path("speed"), exist_ok=True)]
    log = {name: [os.path.join(speed_dir, f"{name}.{test_set}.r{k}.gen") for k in range(1, rounds + 1)]
           for name in r.evaluated}
    for k in range(rounds):
        for i in range(n):
            name = r.evaluated[(i + k) % n]
            actions += generate(r, name, test_set, log[name][k], r.s["SPEED_BATCH_SIZE"])
    actions += [Command(["wd-evaluate", "speed", "--name", name, "--test-set", test_set, "--checkpoint",
                         r.models[name], "--generate-log", *log[name],
                         "--out", os.path.join(speed_dir, f"{name}.{test_set}.json")]) for name in r.evaluated]
    return Stage("speed", actions + [functools.partial(results_table, r)])


def table_notes(r: Recipe) -> List[str]:
    """What the results table notes about how each model was made."""
    s = r.s
    rule = {"epochs": "epoch checkpoints", "updates": f"saves, {s['SAVE_INTERVAL_UPDATES']} updates apart"}
    notes = [f"teacher: average of the last {s['AVG_LAST']} {rule[s['TEACHER_AVERAGE']]}",
             f"kd_student: average of the last {s['AVG_LAST']} {rule[s['STUDENT_AVERAGE']]}",
             f"wd_student: average of the last {s['PHASE2_AVG_LAST']} {rule[s['STUDENT_AVERAGE']]}"]
    if os.path.isdir(r.path("sel_student")):
        notes.append(f"sel_student: KD training from wd-init-student {' '.join(selection_flags(r))}, "
                     "average as kd_student")
    notes.append(f"batch: {s['EFFECTIVE_TOKENS']} tokens per update ({s['NUM_GPUS']} x {s['MAX_TOKENS']} x "
                 f"{s['UPDATE_FREQ']}); dropout {s['DROPOUT']}, attention dropout {s['ATTENTION_DROPOUT']}, "
                 f"activation dropout {s['ACTIVATION_DROPOUT']}")
    return notes


def results_table(r: Recipe) -> None:
    """WORK/results.{json,md} from the records made so far (rows in the order of the models)."""
    records = [path for kind in ("eval", "speed") for name in r.models for test_set in r.test_sets
               if os.path.isfile(path := r.path(kind, f"{name}.{test_set}.json"))]
    notes = [part for note in table_notes(r) for part in ("--note", note)]
    evaluation.cli_main(["table", *records, "--teacher", "teacher", "--title", r.s["PAIR_NAME"],
                         "--json", r.path("results.json"), "--markdown", r.path("results.md"), *notes])


# -- driver ----------------------------------------------------------------------------------

BUILDERS: Dict[str, Callable[[Recipe], Stage]] = {
    "prepare": prepare_stage, "teacher": teacher_stage, "kd_data": kd_data_stage,
    "kd_student": functools.partial(student_stage, name="kd_student"), "wd_phase1": wd_phase1_stage,
    "materialize": materialize_stage, "wd_phase2": wd_phase2_stage, "evaluate": evaluate_stage,
    "speed": speed_stage, "sel_student": sel_student_stage,
}


def user_dir() -> str:
    """The plugin as installed in this environment, the copy its console scripts (wd-train,
    wd-materialize, ...) import; a second copy in one process is refused by fairseq."""
    import wd_fairseq

    return os.path.dirname(os.path.abspath(wd_fairseq.__file__))


def say(text: str) -> None:
    print(text, flush=True)


def log(r: Recipe, text: str) -> None:
    say(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] [{r.s['PAIR_NAME']}] {text}")


def plan(r: Recipe) -> None:
    """Every command of every stage, resolved (a Python step as ``(python) step(...)``; not
    the checks, directories and log lines)."""
    housekeeping = (say, os.makedirs, require_checkpoint, check_disk, require_files)
    for name in STAGES:
        print(f"\n== {name}")
        for action in BUILDERS[name](r).actions:
            if isinstance(action, Command) or action.func not in housekeeping:
                print("  " + describe(action))


def run(r: Recipe, names: List[str], force: bool) -> None:
    """Run the stages ``names`` in order, skipping those done unless ``force``."""
    for sub in ("done", "logs"):
        os.makedirs(r.path(sub), exist_ok=True)
    for name in names:
        mark = r.path("done", name)
        if os.path.exists(mark) and not force:
            log(r, f"skip {name} (done; FORCE=1 pipeline.sh {name} redoes it)")
            continue
        if os.path.exists(mark):
            os.remove(mark)
        stage_log = r.path("logs", f"{name}.log")
        log(r, f"start {name} (log: {stage_log})")
        try:
            for action in BUILDERS[name](r).actions:
                run_action(action, stage_log, name, echo=True)
        except (WDSetupError, SystemExit) as e:
            message = str(e.code if isinstance(e, SystemExit) else e)
            with open(stage_log, "a", encoding="utf-8") as out:
                out.write(f"pipeline.sh: error: {message}\n")
            say(f"pipeline.sh: error: {message}")
            sys.exit(f"pipeline.sh: error: stage {name} failed; see {stage_log}. Rerun to resume")
        write_atomic(mark, "")
        log(r, f"done {name}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("plan", "run"))
    p.add_argument("stages", nargs="*", metavar="STAGE", help=", ".join(BUILDERS))
    p.add_argument("--force", action="store_true", help="redo the stages even if done")
    args = p.parse_intermixed_args(argv)
    settings = dict(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line)
    recipe = Recipe(settings, plan=args.command == "plan")
    if args.command == "plan":
        run_cli("pipeline.sh", lambda: plan(recipe))
    else:
        run(recipe, args.stages, args.force)


if __name__ == "__main__":
    main()
