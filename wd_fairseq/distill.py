"""``wd-distill plan|run``: from a stock fairseq teacher and its data-bin to a scored,
exported student, in resumable stages (``stages.py``) under one work directory.

1. ``kd_data``: ``wd-kd-data`` into ``WORK/data-bin-kd`` (links to the data-bin's files
   and the KD split ``train1``);
2. training, by ``--method``: ``wd`` / ``wd-slice``: phase 1, ``wd-materialize``, phase 2
   (on the learning-rate curve phase 1 started, or the authors' restart);
   ``selection-kd``: ``wd-init-student``, then KD training; ``kd``: KD from scratch;
   ``auto``: by the budget, the README's measured recommendation;
3. ``evaluate``: ``fairseq-generate`` of teacher and student on the test split, scored by
   ``wd-evaluate`` (sacreBLEU with signature, chrF, sentences/s);
4. ``export``: a stock checkpoint without optimizer state, and CTranslate2 int8;
5. ``card``: ``WORK/results.md``, ``results.json`` and (with matplotlib) ``results.png``.

``plan`` and ``run`` first check, before any work (``distill_checks.py``): the teacher, the
data-bin's dictionaries, the student shape, the test split, the disk, and that the work
directory is not another teacher's or data-bin's run.
"""

import argparse
import dataclasses
import functools
import logging
import os
import sys
from typing import Dict, List, Optional

from .arguments import nonnegative_float, nonnegative_int, pair_list, positive_float, positive_int
from .cli import run_cli
from .commands import generate_command, kd_data_command, learning_rate_flags, score_command
from .stages import Command, Stage, run_stages
from .teacher import WDSetupError

logger = logging.getLogger("wd_fairseq.distill")

METHODS = ("auto", "wd", "wd-slice", "selection-kd", "kd")
#: ``--method auto``: WD slice below this many updates, Selection + KD from it on (README,
#: "Which method should I use?": WD slice led at 1,600 updates, Selection + KD at 6,400).
AUTO_WD_BELOW = 3200
PRESETS = ("wd_transformer", "wd_transformer_stu1", "wd_transformer_stu2")


@dataclasses.dataclass(frozen=True)
class DistillJob:
    """The settings of a ``wd-distill`` run (its flags: same names and defaults)."""

    teacher_path: str
    data: Optional[str]  # a data-bin, or None with raw_dir
    work: str
    updates: int
    raw_dir: Optional[str] = None  # raw text RAW/{train,valid,test}.{SRC,TGT}, the teacher's languages
    bpe_codes: Optional[str] = None
    sentencepiece: Optional[str] = None
    tokenizer: str = "moses"
    dicts: Optional[str] = None  # raw text: the teacher's dictionaries (default: its data-bin's)
    method: str = "auto"
    arch: str = "wd_transformer"
    shape: tuple = ()  # ((field, value), ...) of the shape flags given
    phase1_updates: Optional[int] = None  # None: half of --updates
    phase2_schedule: str = "continue"
    lr: float = 7e-4
    warmup_updates: Optional[int] = None  # None: --updates / 16, at most 4,000
    max_tokens: int = 4096
    update_freq: int = 1
    seed: int = 1
    beam: int = 6
    max_len_a: float = 1.2
    max_len_b: int = 10
    test_split: str = "test"
    test_refs: Optional[str] = None
    lang_pairs: Optional[str] = None  # a multilingual teacher's directions to distil (default: all)
    trim: bool = False  # train on teacher and data cut to the tokens of those directions
    kd_engine: Optional[str] = None
    cpu: bool = False
    fp16: bool = False

    @property
    def chosen_method(self) -> str:
        if self.method != "auto":
            return self.method
        return "wd-slice" if self.updates < AUTO_WD_BELOW else "selection-kd"

    @property
    def warmup(self) -> int:
        if self.warmup_updates is not None:
            return self.warmup_updates
        return max(1, min(4000, self.updates // 16))

    @property
    def phase1(self) -> int:
        return self.phase1_updates if self.phase1_updates is not None else max(1, self.updates // 2)

    def path(self, *parts: str) -> str:
        return os.path.join(os.path.abspath(self.work), *parts)

    @property
    def data_bin(self) -> str:
        """The data-bin training and evaluation read: ``--data``, or the one ``prepare`` makes."""
        return os.path.abspath(self.data) if self.data else self.path("data-bin")


def user_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def device_flags(job: DistillJob) -> List[str]:
    return ["--cpu"] if job.cpu else (["--fp16"] if job.fp16 else [])


def training_flags(job: DistillJob, checked, updates: int, save_dir: str, warmup: Optional[int] = None,
                   offset: Optional[int] = None) -> List[str]:
    """What every training stage shares: the teacher's task, the authors' optimizer and
    criterion, the budget's learning-rate curve (``warmup``: default the job's; from update
    ``offset`` on, if given), KD data read as fairseq 0.12 needs it (the translation task:
    ``--upsample-primary 1``), saves for resume."""
    every = max(1, updates // 10)
    kd_split = [] if checked.task_flags else ["--upsample-primary", "1"]
    return [*checked.student_task_flags, *learning_rate_flags(job.lr, warmup or job.warmup, offset),
            "--criterion", "label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--max-tokens", str(job.max_tokens),
            "--update-freq", str(job.update_freq), "--seed", str(job.seed),
            "--max-update", str(updates), *kd_split, "--data-buffer-size", "0",
            "--save-interval-updates", str(every), "--keep-interval-updates", "1",
            "--no-epoch-checkpoints", "--no-progress-bar", "--log-format", "simple",
            "--log-interval", str(min(100, every)), "--save-dir", save_dir, *device_flags(job)]


def student_flags(student: Dict) -> List[str]:
    """The shape flags of phase 1 and ``wd-init-student`` for student args ``student``."""
    from .model import SHAPE_FIELDS

    flags = [part for name in SHAPE_FIELDS for part in ("--" + name.replace("_", "-"), str(student[name]))]
    if student.get("share_decoder_input_output_embed") and not student.get("share_all_embeddings"):
        flags.append("--share-decoder-input-output-embed")
    return flags


def generate(job: DistillJob, data: str, task: List[str], direction, checkpoint: str, out: str) -> Command:
    return generate_command(data, checkpoint, direction, job.test_split, out, job.beam, [
        *task, "--max-len-a", str(job.max_len_a), "--max-len-b", str(job.max_len_b),
        "--batch-size", "64", *device_flags(job)])


def build_stages(job: DistillJob, checked) -> List[Stage]:
    """The stages of ``job``; ``checked``: what ``distill_checks.check_job`` found."""
    from .checkpoints import phase2_flags
    from .distill_card import export_stock, write_card, write_references
    from .distill_data import link_data, prepare_stage

    teacher, kd_bin, method = os.path.abspath(job.teacher_path), job.path("data-bin-kd"), job.chosen_method
    stock = phase2_flags(checked.student)  # (training_flags bring the task's flags)
    stages = [prepare_stage(job, checked)] if job.raw_dir else []  # (distill_data)
    stages += [Stage("kd_data", outputs=[kd_bin], depends=[s.name for s in stages], inputs={
        "teacher": checked.teacher_stamp, "data": checked.data_stamp}, actions=[
        functools.partial(link_data, job.data_bin, kd_bin),
        *[kd_data_command(kd_bin, teacher, direction, job.beam, [
            "--max-len-a", str(job.max_len_a), "--max-len-b", str(job.max_len_b),
            *(["--engine", job.kd_engine] if job.kd_engine else []), *(["--cpu"] if job.cpu else [])])
          for direction in checked.directions]])]
    # what training reads: the KD data-bin and the teacher, or both cut to the used tokens
    train_data, train_teacher = kd_bin, teacher
    if job.trim:
        train_data = job.path("trimmed")
        train_teacher = os.path.join(train_data, "teacher.pt")
        stages.append(Stage("trim", depends=["kd_data"], outputs=[train_data], actions=[Command(
            ["wd-trim-vocab", teacher, kd_bin, train_data, "--force",
             "--pairs", ",".join("-".join(d) for d in checked.directions)])]))
    if method in ("wd", "wd-slice"):
        phase1_dir, phase2_dir = job.path("wd_phase1"), job.path("wd_phase2")
        init, rest = job.path("materialized.pt"), job.updates - job.phase1
        if job.phase2_schedule == "continue":  # phase 2's update s trains at the rate of update phase1 + s
            phase2 = training_flags(job, checked, rest, phase2_dir, offset=job.phase1) + ["--user-dir", user_dir()]
        else:  # the authors' restart: a new warmup (theirs: 1,000 updates)
            phase2 = training_flags(job, checked, rest, phase2_dir, warmup=max(1, min(1000, rest // 4)))
        stages += [
            Stage("wd_phase1", depends=[stages[-1].name], outputs=[phase1_dir], actions=[Command([
                "fairseq-train", train_data, "--user-dir", user_dir(), "--arch", "wd_transformer",
                "--teacher-path", train_teacher, *student_flags(checked.student),
                *(["--wd-init", "slice"] if method == "wd-slice" else []),
                *training_flags(job, checked, job.phase1, phase1_dir)])]),
            Stage("materialize", depends=["wd_phase1"], outputs=[init], actions=[Command(
                ["wd-materialize", os.path.join(phase1_dir, "checkpoint_last.pt"), init])]),
            Stage("wd_phase2", depends=["materialize"], outputs=[phase2_dir], actions=[Command(
                ["fairseq-train", train_data, *stock, "--finetune-from-model", init, *phase2])]),
        ]
        final = os.path.join(phase2_dir, "checkpoint_last.pt")
    else:
        save_dir = job.path("student")
        train = ["fairseq-train", train_data, *stock, *training_flags(job, checked, job.updates, save_dir)]
        actions = [Command(train)]
        if method == "selection-kd":
            init = job.path("selection.pt")
            actions = [Command(["wd-init-student", train_teacher, init, *student_flags(checked.student)]),
                       Command(train + ["--finetune-from-model", init])]
        stages.append(Stage("train", depends=[stages[-1].name], outputs=[save_dir], actions=actions))
        final = os.path.join(save_dir, "checkpoint_last.pt")
    trained, eval_dir, export_dir = stages[-1].name, job.path("eval"), job.path("export")
    evaluate = [functools.partial(os.makedirs, eval_dir, exist_ok=True)]
    for direction in checked.directions:
        pair, tgt = "-".join(direction), direction[1]
        refs = job.test_refs or (os.path.join(os.path.abspath(job.raw_dir), f"{job.test_split}.{tgt}")
                                 if job.raw_dir else os.path.join(eval_dir, f"references.{pair}.txt"))
        for name, data, task, checkpoint in (
                ("teacher", job.data_bin, checked.task_flags, teacher),
                ("student", train_data if job.trim else job.data_bin, checked.student_task_flags, final)):
            evaluate.append(generate(job, data, task, direction, checkpoint, os.path.join(eval_dir, f"{name}.{pair}.gen")))
        if not (job.test_refs or job.raw_dir):
            evaluate.append(functools.partial(write_references, os.path.join(eval_dir, f"teacher.{pair}.gen"),
                                              refs, tgt))
        evaluate += [score_command(os.path.join(eval_dir, f"{name}.{pair}.gen"), [refs], tgt, name,
                                   f"{job.test_split} {pair}", os.path.join(eval_dir, f"{name}.{pair}"))
                     for name in ("teacher", "student")]
    stages += [
        Stage("evaluate", depends=[trained], outputs=[eval_dir], actions=evaluate),
        Stage("export", depends=[trained], outputs=[export_dir], actions=[
            functools.partial(export_stock, final, os.path.join(export_dir, "student.pt")),
            Command(["wd-export-ct2", os.path.join(export_dir, "student.pt"),
                     os.path.join(export_dir, "ct2-int8"), "--quantization", "int8",
                     "--data", train_data if job.trim else job.data_bin])]),
    ]
    stages.append(Stage("card", depends=["evaluate", "export"],
                        outputs=[job.path(f"results.{kind}") for kind in ("md", "json", "png")],
                        actions=[functools.partial(write_card, job.path())]))
    return stages


def job_of(args: argparse.Namespace) -> DistillJob:
    from .model import SHAPE_FIELDS

    shape = tuple((name, getattr(args, name)) for name in SHAPE_FIELDS if getattr(args, name) is not None)
    fields = {f.name for f in dataclasses.fields(DistillJob)} - {"shape"}  # (--until is not a setting)
    return DistillJob(shape=shape, **{name: getattr(args, name) for name in fields})


def parser() -> argparse.ArgumentParser:
    from .model import SHAPE_FIELDS

    p = argparse.ArgumentParser(prog="wd-distill", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("plan", "run"), help="plan: check and print the stages; run: run them")
    p.add_argument("--teacher-path", required=True, metavar="TEACHER.pt", help="stock fairseq translation Transformer")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DATA-BIN",
                        help="fairseq-preprocess output with the teacher's dictionaries: train, valid, test")
    source.add_argument("--raw-dir", metavar="RAW", help="raw text instead: RAW/{train,valid,test}.{SRC,TGT} "
                        "in the teacher's languages, made into WORK/data-bin as the teacher's data")
    subwords = p.add_mutually_exclusive_group()
    subwords.add_argument("--bpe-codes", help="--raw-dir: the subword-nmt BPE codes of the teacher's data")
    subwords.add_argument("--sentencepiece", help="--raw-dir: the SentencePiece model of the teacher's data")
    p.add_argument("--tokenizer", choices=("moses", "none"), default="moses",
                   help="--raw-dir: Moses as the recipes (default), or none (the text is tokenized)")
    p.add_argument("--dicts", help="--raw-dir: the directory of the teacher's dict.SRC.txt and "
                   "dict.TGT.txt (default: its data-bin, from its checkpoint)")
    p.add_argument("--work", required=True, help="the run's directory (created; a rerun resumes it)")
    p.add_argument("--updates", type=positive_int, required=True, help="training updates of the student in all")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help=f"default auto: wd-slice below {AUTO_WD_BELOW} updates, else selection-kd")
    p.add_argument("--arch", choices=PRESETS, default="wd_transformer",
                   help="student preset (the authors' stu1/stu2); shape flags override it")
    for name in SHAPE_FIELDS:
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, help="student shape (default: the teacher's)")
    p.add_argument("--phase1-updates", type=positive_int, help="wd, wd-slice: phase 1's share (default: half)")
    p.add_argument("--phase2-schedule", choices=("continue", "restart"), default="continue",
                   help="phase 2's learning rate: continue phase 1's curve (default; one curve over "
                   "--updates, as the other methods) or restart it (the authors')")
    p.add_argument("--lr", type=positive_float, default=7e-4, help="peak learning rate (default: 7e-4, the authors')")
    p.add_argument("--warmup-updates", type=positive_int, help="default: --updates / 16, at most 4,000")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens per GPU batch (default: 4096)")
    p.add_argument("--update-freq", type=positive_int, default=1)
    p.add_argument("--seed", type=nonnegative_int, default=1)
    p.add_argument("--beam", type=positive_int, default=6, help="KD data and evaluation (default: 6)")
    p.add_argument("--max-len-a", type=nonnegative_float, default=1.2)
    p.add_argument("--max-len-b", type=nonnegative_int, default=10)
    p.add_argument("--test-split", default="test", help="the data-bin split scored (default: test)")
    p.add_argument("--test-refs", help="raw references of the test split (default: its targets in the "
                   "data-bin, BPE removed and Moses-detokenized: compares teacher and student only)")
    p.add_argument("--lang-pairs", type=pair_list, help="a multilingual teacher: the directions to distil "
                   "(e.g. de-en,en-de; default: every direction it was trained on)")
    p.add_argument("--trim", action="store_true", help="train on the teacher and data cut to the tokens "
                   "of the directions distilled (wd-trim-vocab, after the KD data): a smaller student")
    p.add_argument("--kd-engine", choices=("ctranslate2", "fairseq"), help="wd-kd-data --engine")
    p.add_argument("--probe", action="store_true", help="estimate each stage's time from a short "
                   "measured probe (a few batches decoded and trained)")
    p.add_argument("--until", metavar="STAGE", help="run: stop after this stage (e.g. kd_data)")
    p.add_argument("--cpu", action="store_true", help="train and decode on the CPU")
    p.add_argument("--fp16", action="store_true", help="train and decode in fp16 (GPU)")
    return p


def cli_main(argv: Optional[List[str]] = None):
    from .distill_card import plan_text, write_plan
    from .distill_checks import check_job

    progress = logging.getLogger("wd_fairseq.stages")
    if not progress.handlers:  # the stages' progress on stdout, with the time of day
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    args = parser().parse_args(argv)

    def main():
        job = job_of(args)
        fairseq_log = logging.getLogger("fairseq")
        level = fairseq_log.level
        fairseq_log.setLevel(logging.WARNING)  # its task set-up lines while checking: not ours
        try:
            checked = check_job(job)
        finally:
            fairseq_log.setLevel(level)
        stages = build_stages(job, checked)
        estimates = None
        if args.probe:
            from .distill_probe import PROBE_SENTENCES, PROBE_UPDATES, probe

            estimates = probe(job, checked, stages)
            print(f"estimates from a probe: {PROBE_SENTENCES} sentences decoded, {PROBE_UPDATES} updates "
                  "of each training command (start-up included: upper estimates)")
        print(plan_text(job, checked, stages, estimates), flush=True)
        if args.until and args.until not in [stage.name for stage in stages]:
            raise WDSetupError(f"--until {args.until}: not a stage of this run. Fix: one of "
                               + ", ".join(stage.name for stage in stages))
        if args.command == "run":
            checked.claim(job)
            write_plan(job, checked, stages)  # (distill_card)
            run_stages(stages, job.path(), args.until)
            if not args.until:
                with open(job.path("results.md"), encoding="utf-8") as card:
                    print(card.read())

    run_cli("wd-distill", main)


if __name__ == "__main__":
    cli_main()
