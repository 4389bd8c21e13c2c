"""Faults found early and reported clearly: a full disk (a real, small tmpfs), a data-bin
whose dictionary differs from the teacher's, and bad flags of every console script
(refused by the parser, before any model loads)."""

import argparse
import errno
import os
import re
import shutil
import subprocess
from importlib.metadata import entry_points

import pytest
import torch
from fairseq.tasks.translation import TranslationTask
from conftest import BIN, build_wd, preprocess, run_cli

from wd_fairseq import export_ctranslate2, init_student
from wd_fairseq.kd_binarize import Split
from wd_fairseq.kd_data import KDJob, build_kd_split
from wd_fairseq.kd_shards import ShardStore
from wd_fairseq.model import DROPOUT_FIELDS, SHAPE_FIELDS
from wd_fairseq.teacher import WDSetupError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
N_TRAIN = 120


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """``mount(name)``: a fresh tmpfs under tmp_path (the tests run as root, as in CI);
    ``leave_free(path, n)`` then shrinks it to what it holds plus about ``n`` bytes."""
    mounted = []

    def mount(name):
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "wd-test", str(path)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"mount -t tmpfs failed ({proc.stderr.strip()}): the disk-full tests "
                        "need a real small file system, so they run as root")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:  # every mount, even when the test or another umount failed
        # (lazily: this process may still map a file of it, e.g. a data-bin's index)
        failed = [p for p in mounted if subprocess.run(["umount", "--lazy", str(p)]).returncode]
        assert not failed, f"umount --lazy failed for {failed}"


def leave_free(path, free: int) -> None:
    used = shutil.disk_usage(path).used
    subprocess.run(["mount", "-o", f"remount,size={used + free}", str(path)], check=True)
    assert abs(shutil.disk_usage(path).free - free) < 4096


def fill(directory) -> None:
    """Write zeros until the disk is full (another program filling it)."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC


@pytest.fixture(scope="module")
def small_bin(raw_corpus, data_bin, tmp_path_factory):
    """The first N_TRAIN training pairs, binarised with the teacher's dictionaries."""
    raw = tmp_path_factory.mktemp("raw-small")
    for lang in ("src", "tgt"):
        for split in ("train", "valid", "test"):
            lines = (raw_corpus / f"{split}.{lang}").read_text().splitlines()
            (raw / f"{split}.{lang}").write_text("\n".join(lines[:N_TRAIN]) + "\n")
    return preprocess(raw, tmp_path_factory.mktemp("bin-small"), "--srcdict",
                      data_bin / "dict.src.txt", "--tgtdict", data_bin / "dict.tgt.txt")


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def refusal(tool, *args) -> str:
    """The message of a console script that refuses to start (exit status 1, no traceback)."""
    proc = run_cli(tool, *args, check=False, env=ONE_THREAD)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    print(message)
    return message


NO_SPACE = (r"not enough disk space for {what}: it needs about (?P<needed>[\d.]+ [KM]iB) "
            r"\(estimate\), (?P<free>[\d.]+ [KM]?i?B) is free there\. Fix: free space ")


@pytest.mark.parametrize("engine,free,what", [
    ("fairseq", 8192, r"the KD split 'train1' \(decoded shards in kd-train1/, then "
                      r"train1\.src-tgt\.\{src,tgt\}\.\*\)"),
    # enough for the KD split (about 15 KiB), not for the teacher's conversion
    ("ctranslate2", 96 * 1024, r"the KD split 'train1' \(teacher conversion and decoded shards "
                               r"in kd-train1/, then train1\.src-tgt\.\{src,tgt\}\.\*\)"),
], ids=["fairseq", "ctranslate2"])
def test_kd_data_refuses_a_disk_too_small_before_decoding(engine, free, what, small_bin,
                                                          postnorm_teacher, small_disk):
    disk = small_disk("disk")
    data = shutil.copytree(small_bin, disk / "bin")
    leave_free(disk, free)
    before = listing(data)
    message = refusal("wd-kd-data", data, "--teacher-path", postnorm_teacher, "--cpu",
                      "--engine", engine)
    assert re.fullmatch(rf"wd-kd-data: error: {data}: " + NO_SPACE.format(what=what) + r".*rerun.*",
                        message), message
    assert listing(data) == before  # no work directory, no temporary file


def fill_before(monkeypatch, owner, name: str, directory):
    """Let ``owner.name`` run only once the disk of ``directory`` is full."""
    original = getattr(owner, name)

    def filled_first(*args, **kwargs):
        fill(directory)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, filled_first)


def test_kd_data_disk_full_while_writing_train1_keeps_the_shards_and_resumes(
        small_bin, postnorm_teacher, small_disk, tmp_path, monkeypatch, one_thread):
    """The disk fills after decoding (up-front check passed): a clear error, no partial
    file, the decoded shards kept; once space is freed, the rerun decodes nothing."""
    clean = shutil.copytree(small_bin, tmp_path / "clean")
    build_kd_split(KDJob(str(clean), str(postnorm_teacher), cpu=True, engine="fairseq"))
    disk = small_disk("disk")
    data = shutil.copytree(small_bin, disk / "bin")
    fill_before(monkeypatch, ShardStore, "merged", disk)
    with pytest.raises(WDSetupError) as error:
        build_kd_split(KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq"))
    message = str(error.value)
    print(message)
    assert re.fullmatch(rf"{data}: " + NO_SPACE.format(
        what=r"the KD split 'train1' \(.*\) \(the disk filled while writing: \[Errno 28\] "
        r"No space left on device(: '[^']+')?\)") + r".*the decoded shards in \S+kd-train1 are kept "
        r"and the run resumes", message), message
    assert not list(data.glob(".kd-tmp*")) and not list(data.glob("kd-train1/*.tmp"))
    assert not Split(str(data), "train1", "src", "tgt").visible()
    assert sum(len(p.read_text().splitlines()) for p in data.glob("kd-train1/part-*.tsv")) == N_TRAIN

    monkeypatch.undo()
    os.remove(disk / "filler")
    monkeypatch.setattr(TranslationTask, "inference_step",
                        lambda *a, **k: pytest.fail("decoded a sentence again"))
    summary = build_kd_split(KDJob(str(data), str(postnorm_teacher), cpu=True, engine="fairseq"))
    assert summary["decoded_this_run"] == 0
    for name in ("train1.src-tgt.tgt.bin", "train1.src-tgt.tgt.idx", "kd-train1/train1.tgt"):
        assert (data / name).read_bytes() == (clean / name).read_bytes(), name


def test_export_ct2_disk_full_while_converting_leaves_nothing(data_bin, postnorm_teacher,
                                                             small_disk, monkeypatch):
    """The disk fills between the up-front check and the conversion's torch.save, whose
    own error ('unexpected pos') does not say 'disk'."""
    disk = small_disk("disk")
    fill_before(monkeypatch, torch, "save", disk)
    with pytest.raises(SystemExit) as exit_info:
        export_ctranslate2.cli_main([str(postnorm_teacher), str(disk / "ct2"), "--data",
                                     str(data_bin)])
    message = str(exit_info.value.code)
    print(message)
    assert re.fullmatch(rf"wd-export-ct2: error: {disk}: " + NO_SPACE.format(
        what=rf"the CTranslate2 conversion of {postnorm_teacher} \(a copy of it, then the "
        r"model\) \(the disk filled while writing: .*(unexpected pos|file write failed).*\)")
        + r"on that file system .*", message), message
    assert listing(disk) == ["filler"]


def test_export_ct2_refuses_a_disk_too_small(data_bin, postnorm_teacher, small_disk):
    disk = small_disk("disk")
    leave_free(disk, 64 * 1024)
    message = refusal("wd-export-ct2", postnorm_teacher, disk / "ct2", "--data", data_bin)
    assert re.fullmatch(rf"wd-export-ct2: error: {disk}: " + NO_SPACE.format(
        what=rf"the CTranslate2 conversion of {postnorm_teacher} \(a copy of it, then the "
        r"model\)") + ".*", message), message
    assert listing(disk) == []


def test_student_checkpoint_refused_up_front_and_reported_when_the_disk_fills(
        postnorm_teacher, small_disk, monkeypatch):
    """wd-init-student (wd-materialize and wd-trim-vocab save the same way)."""
    disk = small_disk("disk")
    leave_free(disk, 16 * 1024)
    message = refusal("wd-init-student", postnorm_teacher, disk / "student.pt",
                      "--decoder-layers", "1")
    assert re.fullmatch(rf"wd-init-student: error: {disk}: " + NO_SPACE.format(
        what=rf"STUDENT {disk}/student\.pt") + "there, or choose another output path",
        message), message
    assert listing(disk) == []

    leave_free(disk, 64 << 20)
    fill_before(monkeypatch, torch, "save", disk)
    with pytest.raises(SystemExit) as exit_info:
        init_student.cli_main([str(postnorm_teacher), str(disk / "student.pt")])
    message = str(exit_info.value.code)
    print(message)
    assert re.fullmatch(rf"wd-init-student: error: {disk}: " + NO_SPACE.format(
        what=rf"STUDENT {disk}/student\.pt \(the disk filled while writing: \[Errno 28\] No "
        r"space left on device\)") + ".*", message), message
    assert listing(disk) == ["filler"]


# -- a dictionary that lies ----------------------------------------------------------------


@pytest.fixture
def renamed_symbol(small_bin, tmp_path):
    """small_bin with one target symbol renamed in dict.tgt.txt (same size)."""
    data = shutil.copytree(small_bin, tmp_path / "renamed")
    lines = (data / "dict.tgt.txt").read_text().splitlines()
    lines[5] = "renamed " + lines[5].split()[1]
    (data / "dict.tgt.txt").write_text("\n".join(lines) + "\n")
    return data


def lying_dictionary(teacher, data_bin, data) -> str:
    return (rf"{teacher}: it was trained with {data_bin}/dict\.tgt\.txt, which differs from the "
            rf"data's target dictionary \({data}/dict\.tgt\.txt\) in 1 of its \d+ symbols\. Fix: "
            rf"use the data-bin it was trained with, or binarise the data with fairseq-preprocess "
            rf"--tgtdict {data_bin}/dict\.tgt\.txt")


@pytest.mark.parametrize("engine", [[], ["--engine", "fairseq"]], ids=["default", "fairseq"])
def test_kd_data_refuses_a_renamed_symbol_with_every_engine(engine, renamed_symbol, data_bin,
                                                          postnorm_teacher):
    """The default engine (CTranslate2) checks the data as the fairseq engine does,
    before converting or decoding anything."""
    before = listing(renamed_symbol)
    message = refusal("wd-kd-data", renamed_symbol, "--teacher-path", postnorm_teacher, "--cpu",
                      *engine)
    assert re.fullmatch(r"wd-kd-data: error: --teacher-path " + lying_dictionary(
        postnorm_teacher, data_bin, renamed_symbol), message), message
    assert listing(renamed_symbol) == before


def test_export_ct2_refuses_data_whose_dictionary_differs(renamed_symbol, data_bin,
                                                         postnorm_teacher, tmp_path):
    message = refusal("wd-export-ct2", postnorm_teacher, tmp_path / "ct2", "--data", renamed_symbol)
    assert re.fullmatch(r"wd-export-ct2: error: STUDENT " + lying_dictionary(
        postnorm_teacher, data_bin, renamed_symbol), message), message
    assert not (tmp_path / "ct2").exists()


# -- bad flags ------------------------------------------------------------------------------

MISSING = "/nonexistent/teacher.pt"
#: Tools without numeric or choice flags of their own: wd-materialize (paths only) and
#: wd-train (every flag is fairseq-train's, checked by it).
NO_OWN_FLAGS = {"wd-materialize", "wd-train"}


def bad_flags(tmp):
    """(tool, argv, flag, pattern of the message): every numeric and choice flag of every
    console script, with a bad value and otherwise arguments that would fail later (a
    missing teacher), so a message about the flag means it was checked first."""
    kd = ["wd-kd-data", [tmp, "--teacher-path", MISSING]]
    cases = [
        (*kd, "--beam", "0"), (*kd, "--beam", "-2"), (*kd, "--max-tokens", "0"),
        (*kd, "--batch-size", "0"), (*kd, "--save-every", "0"), (*kd, "--threads", "0"),
        (*kd, "--workers", "0"), (*kd, "--lenpen", "-1"), (*kd, "--lenpen", "nan"),
        (*kd, "--max-len-a", "-1"), (*kd, "--max-len-b", "-1"), (*kd, "--max-len-b", "1.5"),
        (*kd, "--filter-length-ratio", "0.5"), (*kd, "--filter-min-score", "inf"),
        (*kd, "--quantization", "int4"), (*kd, "--engine", "marian"), (*kd, "--limit", "0"),
        (*kd, "--num-shards", "0"), (*kd, "--shard-id", "-1"),
        ("wd-export-ct2", [MISSING, f"{tmp}/ct2"], "--quantization", "int4"),
        ("wd-trim-vocab", [MISSING, tmp, f"{tmp}/out"], "--pairs", "es"),
        ("wd-evaluate", ["score", "--generate-log", "log", "--refs", "ref", "--lang", "en",
                         "--name", "t", "--out", f"{tmp}/o.json"], "--convention", "bleu"),
    ]
    translate = ["wd-translate", ["--model", MISSING]]
    cases += [(*translate, "--beam", "0"), (*translate, "--lenpen", "inf"),
              (*translate, "--max-len-a", "-1"), (*translate, "--max-len-b", "0"),
              (*translate, "--batch-size", "0"), (*translate, "--max-tokens", "0"),
              (*translate, "--threads", "0"), (*translate, "--bpe-vocabulary-threshold", "0"),
              (*translate, "--tokenizer", "spacy"), (*translate, "--device", "tpu")]
    student = ["wd-init-student", [MISSING, f"{tmp}/student.pt"]]
    cases += [(*student, "--" + name.replace("_", "-"), "0") for name in SHAPE_FIELDS]
    cases += [(*student, "--" + name.replace("_", "-"), "1") for name in DROPOUT_FIELDS]
    cases += [(*student, "--layers", "middle"), (*student, "--dims", "last"),
              (*student, "--arch", "big"), (*student, "--init", "random"), (*student, "--seed", "-1")]
    distill = ["wd-distill", ["run", "--teacher-path", MISSING, "--data", tmp, "--work", f"{tmp}/w",
                              "--updates", "8"]]
    cases += [(*distill, "--" + name.replace("_", "-"), "0") for name in SHAPE_FIELDS]
    cases += [(*distill, "--updates", "0"), (*distill, "--method", "best"), (*distill, "--arch", "big"),
              (*distill, "--phase1-updates", "0"), (*distill, "--phase2-schedule", "cosine"),
              (*distill, "--lr", "0"), (*distill, "--warmup-updates", "0"), (*distill, "--max-tokens", "0"),
              (*distill, "--update-freq", "0"), (*distill, "--seed", "-1"), (*distill, "--beam", "0"),
              (*distill, "--max-len-a", "-1"), (*distill, "--max-len-b", "-1"),
              (*distill, "--kd-engine", "marian"), (*distill, "--tokenizer", "spacy"),
              (*distill, "--lang-pairs", "es")]
    return cases


def console_script(name):
    (script,) = [s for s in entry_points(group="console_scripts") if s.name == name]
    return script.load()


def run_in_process(tool, argv, monkeypatch, capsys):
    """A console script's entry point, as its executable calls it; (exit code, stderr)."""
    monkeypatch.setattr("sys.argv", [tool, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        console_script(tool)()
    code = exit_info.value.code
    return code, capsys.readouterr().err + (code if isinstance(code, str) else "")


CASES = bad_flags("{tmp}")


@pytest.mark.parametrize("tool,argv,flag,value", CASES,
                         ids=[f"{c[0]}{c[2]}={c[3]}" for c in CASES])
def test_bad_flag_is_refused_by_the_parser(tool, argv, flag, value, tmp_path, monkeypatch,
                                           capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, stderr = run_in_process(tool, [*argv, flag, value], monkeypatch, capsys)
    assert code == 2, stderr
    assert re.search(rf"{tool}.*: error: argument {flag}: (must be .*, got |invalid choice: )"
                     rf"'{re.escape(value)}'", stderr), stderr
    assert not any(tmp_path.iterdir())


def test_kd_data_quantization_of_the_other_device_refused_before_the_teacher(
        tmp_path, monkeypatch, capsys):
    code, stderr = run_in_process("wd-kd-data", [tmp_path, "--teacher-path", MISSING, "--cpu",
                                                 "--quantization", "float16"], monkeypatch, capsys)
    assert code == "wd-kd-data: error: --quantization float16: not available on the cpu " \
        "(choose int8, float32). Fix: pick one of those, or run on a GPU", stderr


@pytest.mark.parametrize("argv,message", [
    (["--num-shards", "3", "--shard-id", "3"],
     "argument --shard-id: must be less than --num-shards (3), got '3'"),
    (["--shard-id", "1"], "argument --shard-id: needs --num-shards N"),
    (["--num-shards", "3"], "argument --num-shards: a shard job needs --shard-id I (0 to N-1); "
     "to merge the shards run wd-kd-data merge DATA ... --num-shards N"),
    (["merge"], "merge needs --num-shards N, the number of shard jobs (and their other flags)"),
    (["merge", "--num-shards", "3", "--shard-id", "0"],
     "argument --shard-id: merge takes every shard. Fix: drop --shard-id"),
], ids=["id-not-below-n", "id-alone", "n-alone", "merge-without-n", "merge-with-id"])
def test_kd_data_shard_flags_are_refused_by_the_parser(argv, message, tmp_path, monkeypatch,
                                                       capsys):
    merge = argv[:1] == ["merge"]
    code, stderr = run_in_process("wd-kd-data", argv[:merge] + [tmp_path, "--teacher-path",
                                                                MISSING] + argv[merge:],
                                  monkeypatch, capsys)
    assert code == 2, stderr
    prog = "wd-kd-data merge" if merge else "wd-kd-data"
    assert stderr.strip().splitlines()[-1] == f"{prog}: error: {message}"
    assert not any(tmp_path.iterdir())


def test_every_numeric_and_choice_flag_is_in_the_table(monkeypatch):
    """Each console script's parser: no plain int/float flag (unchecked range), and every
    typed or choice flag has a bad value in bad_flags."""
    tested = {(tool, flag) for tool, _, flag, _ in CASES}
    tools = sorted(s.name for s in entry_points(group="console_scripts")
                   if s.value.startswith("wd_fairseq."))
    assert set(tools) - NO_OWN_FLAGS == {tool for tool, _ in tested}
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for tool in sorted(set(tools) - {"wd-train"}):
        parsers.clear()
        monkeypatch.setattr("sys.argv", [tool])
        with pytest.raises(SystemExit):
            console_script(tool)()
        todo, checked = list(parsers), set()
        while todo:
            for action in todo.pop()._actions:
                if isinstance(action, argparse._SubParsersAction):
                    todo += action.choices.values()
                elif action.option_strings and (action.type or action.choices):
                    flag = max(action.option_strings, key=len)
                    assert action.type not in (int, float), f"{tool} {flag}: no range check"
                    checked.add(flag)
        assert checked == {flag for t, flag in tested if t == tool}, tool


def test_the_installed_console_script_exits_2_naming_the_flag(tmp_path):
    """The real executable, once: argparse's exit status and message."""
    proc = subprocess.run([str(BIN / "wd-kd-data"), str(tmp_path), "--teacher-path", MISSING,
                           "--max-tokens", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "wd-kd-data: error: argument --max-tokens: must be an integer >= 1, got '0'"


# -- a checkpoint that would run code -------------------------------------------------------


class RunsCode:
    """Pickled as a call of os.system: what loading the file fully would run."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("payload,name", [(shutil.copytree, "shutil.copytree"),
                                          (RunsCode(), r"posix\.system")],
                         ids=["global", "call"])
def test_a_code_executing_checkpoint_is_refused_by_every_tool_naming_the_global(
        payload, name, small_bin, tmp_path, monkeypatch, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": None, "payload": payload}, evil)
    out = tmp_path / "out"
    runs = {
        "wd-kd-data": [small_bin, "--teacher-path", evil], "wd-export-ct2": [evil, out],
        "wd-materialize": [evil, out], "wd-init-student": [evil, out],
        "wd-trim-vocab": [evil, small_bin, out],
    }
    refusal = (rf"{evil}: holds a Python object \({name}\) that safe loading \(torch\.load "
               r"weights_only\) refuses: loading the file would run code\. Fix: do not load a "
               r"file you do not trust; if you trust it, re-save its contents without that object")
    for tool, argv in runs.items():
        code, stderr = run_in_process(tool, argv, monkeypatch, capsys)
        message = stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"{tool}: error: \S+ " + refusal, message), message
        assert not out.exists()
    with pytest.raises(WDSetupError, match="^--teacher-path " + refusal):
        build_wd(small_bin, evil)
