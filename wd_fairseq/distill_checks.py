"""What ``wd-distill`` checks before any work, and what its plan reports: the teacher
and the data-bin (one rule with every tool: ``teacher.load_teacher``), the student
shape (``init_student.student_shape``), the splits, the disk, the work directory's
owner; the GPUs fairseq will see, the effective batch, disk per stage."""

import argparse
import dataclasses
import glob
import json
import os
from typing import Dict, List, Tuple

from .disk_space import human, require_free_space
from .distill_data import raw_files
from .files import file_stamp, write_atomic
from .teacher import WDSetupError

#: Bytes per parameter of a training checkpoint (fp32 weights and Adam's two moments).
TRAINING_BYTES = 12


@dataclasses.dataclass
class Checked:
    """The student's stock args, the languages, file stamps of teacher and data, the
    parameter counts and the disk estimate per stage (bytes)."""

    student: Dict
    source_lang: str
    target_lang: str
    teacher_stamp: Dict
    data_stamp: Dict
    teacher_params: int
    student_params: int
    disk: Dict[str, int]
    dicts: str  # the directory of the dictionaries checked against the teacher
    directions: List[Tuple[str, str]]  # (source, target) of every direction distilled
    task_flags: List[str]  # the teacher's task flags (none for bilingual translation)
    student_task_flags: List[str]  # the same for training and the student (--trim: the trimmed task's)

    def owner(self) -> Dict:
        return {"teacher": self.teacher_stamp["path"], "data": self.data_stamp["path"]}

    def claim(self, job) -> None:
        """Record this run as the work directory's (``WORK/distill.json``)."""
        os.makedirs(job.path(), exist_ok=True)
        write_atomic(job.path("distill.json"), json.dumps(self.owner(), indent=2) + "\n")


def check_job(job) -> Checked:
    """Refuse, before any work, what would fail later; else what the plan needs."""
    import torch
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.transformer import TransformerModel

    from .checkpoints import run_task
    from .init_student import student_shape
    from .model import SHAPE_FIELDS, transformer_arg_names
    from .teacher import load_teacher, read_checkpoint

    if job.data and not os.path.isdir(job.data):
        raise WDSetupError(f"--data {job.data}: no such directory. Fix: pass the teacher's "
                           "fairseq-preprocess output (dict.*.txt, train, valid, test)")
    for flag, path in (("--bpe-codes", job.bpe_codes), ("--sentencepiece", job.sentencepiece),
                       ("--dicts", job.dicts)):
        if path and not os.path.exists(path):
            raise WDSetupError(f"{flag} {path}: no such file or directory. Fix: pass an existing one")
    _check_owner(job)
    state = read_checkpoint(job.teacher_path, "--teacher-path")
    dicts = os.path.abspath(job.data or job.dicts or str(state["cfg"]["task"]["data"]))
    if not os.path.isdir(dicts):
        raise WDSetupError(f"--teacher-path {job.teacher_path}: the data-bin of its run ({dicts}) "
                           "is missing. Fix: pass --dicts with the directory of its dict.*.txt")
    task = run_task(state["cfg"], f"--teacher-path {job.teacher_path}", dicts)
    _, teacher_args = load_teacher(job.teacher_path, task, state=state)
    teacher_args = {k: v for k, v in teacher_args.items() if k in transformer_arg_names()}
    directions, flags_of_task = _directions(job, state["cfg"]["task"], task, dicts)
    trimmed_flags = _trimmed_task_flags(job, flags_of_task, task, directions)
    src, tgt = directions[0]
    raw = raw_files(job.raw_dir, src, tgt) if job.raw_dir else []
    for (s, t), split in ((d, split) for d in directions for split in ("train", "valid", job.test_split)):
        if job.data and not glob.glob(os.path.join(job.data, f"{split}.{s}-{t}.{s}.idx")):
            raise WDSetupError(f"--data {job.data}: no split '{split}' for {s}-{t} "
                               f"({split}.{s}-{t}.{s}.idx). Fix: binarise it with "
                               "fairseq-preprocess (--trainpref, --validpref, --testpref) and the "
                               "teacher's dictionaries (--srcdict, --tgtdict)")
    flags = dict(job.shape)
    if job.arch != "wd_transformer":  # the preset fills in what the flags leave unset
        preset = argparse.Namespace(**{name: flags.get(name) for name in SHAPE_FIELDS})
        ARCH_CONFIG_REGISTRY[job.arch](preset)
        flags = {name: getattr(preset, name) for name in SHAPE_FIELDS}
    student = student_shape(teacher_args, flags)
    if all(student[name] == teacher_args[name] for name in SHAPE_FIELDS):
        raise WDSetupError("the student has the teacher's shape: nothing to distil. Fix: pass a "
                           "preset (--arch wd_transformer_stu1) or smaller shape flags "
                           "(e.g. --decoder-layers 1 --decoder-embed-dim 256)")
    if job.chosen_method in ("wd", "wd-slice") and job.phase1 >= job.updates:
        raise WDSetupError(f"--phase1-updates {job.phase1}: leaves no update of --updates "
                           f"{job.updates} for phase 2. Fix: pass fewer phase-1 updates")
    if job.test_refs and len(directions) > 1:
        raise WDSetupError(f"--test-refs {job.test_refs}: one file for {len(directions)} directions. "
                           "Fix: leave it out (each direction is scored against its data-bin targets)")
    if job.test_refs and not os.path.isfile(job.test_refs):
        raise WDSetupError(f"--test-refs {job.test_refs}: no such file. Fix: pass the raw "
                           "references of the test split, one line per sentence")
    built = TransformerModel.build_model(argparse.Namespace(**student), task)
    student_params = sum(p.numel() for p in built.parameters())
    teacher_params = sum(t.numel() for t in state["model"].values() if torch.is_tensor(t))
    data_stamp = (_data_stamp(job.data, directions) if job.data else
                  {"path": os.path.abspath(job.raw_dir), "files": {f: file_stamp(f) for f in raw + [
                      p for p in (job.bpe_codes, job.sentencepiece) if p]}})
    checked = Checked(student, src, tgt, file_stamp(job.teacher_path), data_stamp,
                      teacher_params, student_params, {}, dicts, directions, flags_of_task,
                      trimmed_flags)
    checked.disk = _disk(job, checked)
    parent = job.path() if os.path.isdir(job.path()) else os.path.dirname(job.path())
    require_free_space(parent, sum(checked.disk.values()), f"--work {job.work} (the run's files, "
                       "estimate)", "free space there or pass --work on a bigger disk")
    return checked


def _directions(job, task_cfg, task, dicts: str) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The directions to distil and the task flags every command repeats: the bilingual
    task's one direction; a multilingual teacher's ``--lang-pairs`` (default: all it was
    trained on), with its fixed dictionary read from the data-bin."""
    from .checkpoints import task_flags
    from .teacher import task_langs

    flags = task_flags(task_cfg)
    if not flags:
        src, tgt = task_langs(task)
        if job.lang_pairs and job.lang_pairs != f"{src}-{tgt}":
            raise WDSetupError(f"--lang-pairs {job.lang_pairs}: the teacher translates {src}-{tgt} only. "
                               "Fix: leave --lang-pairs out")
        return [(src, tgt)], []
    if job.raw_dir:
        raise WDSetupError("--raw-dir: multilingual teachers need their data-bin (--data). Fix: "
                           "binarise each direction as docs/multilingual.md shows")
    settings = vars(task_cfg) if isinstance(task_cfg, argparse.Namespace) else task_cfg
    trained = settings["lang_pairs"]
    trained = trained.split(",") if isinstance(trained, str) else list(trained)
    pairs = job.lang_pairs.split(",") if job.lang_pairs else trained
    unknown = [pair for pair in pairs if pair not in trained]
    if unknown:
        raise WDSetupError(f"--lang-pairs: {','.join(unknown)} not among the teacher's directions "
                           f"({','.join(trained)}). Fix: pick from those")
    flags = _replace_value(flags, "--lang-pairs", ",".join(pairs))
    if "--fixed-dictionary" in flags:  # the teacher's file, as found in this data-bin
        fixed = os.path.join(dicts, os.path.basename(flags[flags.index("--fixed-dictionary") + 1]))
        flags = _replace_value(flags, "--fixed-dictionary", fixed)
    return [tuple(pair.split("-")) for pair in pairs], flags


def _trimmed_task_flags(job, flags: List[str], task, directions) -> List[str]:
    """The task flags after ``wd-trim-vocab`` (what its trim.json's phase1_flags say): the
    kept languages in the teacher's order, the fixed dictionary in the trimmed data-bin."""
    if not (job.trim and flags):
        return flags
    kept = {lang for direction in directions for lang in direction}
    flags = _replace_value(flags, "--langs", ",".join(lang for lang in task.langs if lang in kept))
    if "--lang-dict" in flags:
        at = flags.index("--lang-dict")
        flags = flags[:at] + flags[at + 2:]
    if "--fixed-dictionary" in flags:
        flags = _replace_value(flags, "--fixed-dictionary", job.path("trimmed", f"dict.{directions[0][0]}.txt"))
    return flags


def _replace_value(flags: List[str], flag: str, value: str) -> List[str]:
    flags = list(flags)
    if flag in flags:
        flags[flags.index(flag) + 1] = value
    else:
        flags += [flag, value]
    return flags


def _check_owner(job) -> None:
    path = job.path("distill.json")
    if not os.path.exists(path):
        if os.path.isdir(job.path()) and os.listdir(job.path()):
            raise WDSetupError(f"--work {job.work}: exists and holds other files, not a "
                               "wd-distill run. Fix: pass a new or empty directory")
        return
    with open(path, encoding="utf-8") as f:
        owner = json.load(f)
    mine = {"teacher": os.path.abspath(job.teacher_path), "data": os.path.abspath(job.data or job.raw_dir)}
    if owner != mine:
        raise WDSetupError(f"--work {job.work}: holds the run of teacher {owner['teacher']} on "
                           f"{owner['data']} ({path}). Fix: pass another --work, or remove "
                           "that directory to start over")


def _data_stamp(data: str, directions: List[Tuple[str, str]]) -> Dict:
    """Path, and size and mtime of the files training reads (dictionaries, train splits)."""
    files = sorted(glob.glob(os.path.join(data, "dict.*.txt")) + [
        f for src, tgt in directions for f in glob.glob(os.path.join(data, f"train.{src}-{tgt}.*"))])
    return {"path": os.path.abspath(data),
            "files": {os.path.basename(f): [s["size"], s["mtime_ns"]] for f in files
                      for s in [file_stamp(f)]}}


def _disk(job, checked: Checked) -> Dict[str, int]:
    """Bytes each stage leaves on disk (estimates: 3 training checkpoints a stage)."""
    train_bytes = sum(os.path.getsize(os.path.join(checked.data_stamp["path"], os.path.basename(f)))
                      for f in checked.data_stamp["files"] if os.path.basename(f).startswith("train."))
    if job.raw_dir:  # the tokenized text and the data-bin prepare writes: about the raw size, twice
        train_bytes *= 3
    student = 3 * TRAINING_BYTES * checked.student_params
    disk = {"kd_data": train_bytes + checked.teacher_params}  # + the int8 teacher conversion
    if job.chosen_method in ("wd", "wd-slice"):
        # phase 1: the frozen teacher inside the model, generators about twice the student
        disk["wd_phase1"] = 3 * (4 * checked.teacher_params + 2 * TRAINING_BYTES * checked.student_params)
        disk["materialize"] = 4 * checked.student_params
        disk["wd_phase2"] = student
    else:
        disk["train"] = student + (4 * checked.student_params if job.chosen_method == "selection-kd" else 0)
    disk["export"] = 5 * checked.student_params  # fp32 checkpoint + int8 model
    return disk


def resources(job, checked: Checked) -> List[str]:
    """The plan's lines on devices, batch, model sizes and disk."""
    import torch

    gpus = 0 if job.cpu else torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    processes = max(1, gpus)
    device = "CPU" if gpus == 0 else f"{gpus} GPU(s) (CUDA_VISIBLE_DEVICES={visible or '(unset)'})"
    precision = ", fp16" if job.fp16 else (", fp32: pass --fp16 for the authors' precision" if gpus else "")
    lines = [f"devices: {device}; fairseq-train runs {processes} process(es){precision}",
             f"batch: {processes} x {job.max_tokens} tokens x update-freq {job.update_freq} = "
             f"{processes * job.max_tokens * job.update_freq:,} tokens per update (authors: 32,768); "
             f"lr {job.lr}, warmup {job.warmup} updates, {job.updates:,} updates",
             f"models: teacher {checked.teacher_params / 1e6:.1f}M parameters, student "
             f"{checked.student_params / 1e6:.1f}M ({', '.join(f'{k}={v}' for k, v in job.shape) or job.arch})",
             f"disk (estimate): {human(sum(checked.disk.values()))}: "
             + ", ".join(f"{stage} {human(size)}" for stage, size in checked.disk.items())]
    return lines
