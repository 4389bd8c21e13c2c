"""Resumable stages of a run directory (``wd-distill``): each stage is a list of actions
(console-script commands and Python steps) with a fingerprint of what it depends on, a
log, and a done mark.

``WORK/done/NAME`` holds the fingerprint the stage finished with. A stage whose mark
matches is skipped; one with no mark reruns its actions, whose tools resume what a
killed run left (``fairseq-train`` from ``checkpoint_last.pt``, ``wd-kd-data`` from its
shards); one whose mark holds another fingerprint (other settings, teacher or data, or
an upstream stage that reran) has its outputs removed first. A stage's fingerprint
includes those of the stages it reads, so a change reruns everything downstream.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Union

from .files import file_stamp, write_atomic
from .teacher import WDSetupError

logger = logging.getLogger("wd_fairseq.stages")


@dataclasses.dataclass(frozen=True)
class Command:
    """A command line. Its stdout and stderr go to the stage log; or both to ``output``, or
    stdout alone to ``stdout`` (a file written whole: a temporary file renamed at the end).
    ``creates``: the (non-empty) file it makes; while that file exists a rerun skips the
    command, so a resumed stage keeps the steps it finished. With ``inputs`` (files it
    reads), only while the command line and the inputs' sizes and mtimes are those it was
    made from (recorded in ``CREATES.made``)."""

    argv: List[str]
    output: Optional[str] = None
    stdout: Optional[str] = None
    creates: Optional[str] = None
    inputs: Sequence[str] = ()

    def line(self) -> str:
        text = " ".join(shlex.quote(str(part)) for part in self.argv)
        if self.output:
            return f"{text} > {shlex.quote(self.output)} 2>&1"
        return f"{text} > {shlex.quote(self.stdout)}" if self.stdout else text


Action = Union[Command, functools.partial]  # a Python step: a partial of a function


@dataclasses.dataclass
class Stage:
    """One stage: ``actions`` in order; ``outputs``: the paths it writes (removed when
    its fingerprint changes); ``depends``: the stages it reads; ``inputs``: anything
    else its result depends on (file stamps)."""

    name: str
    actions: List[Action]
    outputs: List[str] = dataclasses.field(default_factory=list)
    depends: List[str] = dataclasses.field(default_factory=list)
    inputs: Dict = dataclasses.field(default_factory=dict)


def describe(action: Action) -> str:
    """A command line, or ``(python) step(arguments)`` for a Python step (run in-process)."""
    if isinstance(action, Command):
        return action.line()
    arguments = ", ".join(repr(a) for a in action.args)
    return f"(python) {action.func.__name__}({arguments})"


def fingerprints(stages: List[Stage]) -> Dict[str, str]:
    """Each stage's fingerprint: a hash of its actions, inputs and upstream fingerprints."""
    found: Dict[str, str] = {}
    for stage in stages:
        record = {"actions": [describe(a) for a in stage.actions], "inputs": stage.inputs,
                  "depends": [found[name] for name in stage.depends]}
        found[stage.name] = hashlib.sha256(
            json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return found


def status(stage: Stage, work: str, fingerprint: str) -> str:
    """``done``, ``to run`` (no mark) or ``to rerun`` (marked with another fingerprint)."""
    mark = os.path.join(work, "done", stage.name)
    if not os.path.exists(mark):
        return "to run"
    with open(mark, encoding="utf-8") as f:
        return "done" if f.read().strip() == fingerprint else "to rerun"


def run_stages(stages: List[Stage], work: str, until: Optional[str] = None) -> None:
    """Run every stage not done yet, in order, up to ``until`` (a stage name; default:
    all); a failing command stops the run naming its log (the same command then resumes
    from that stage)."""
    for sub in ("done", "logs"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    prints = fingerprints(stages)
    for number, stage in enumerate(stages, 1):
        state, header = status(stage, work, prints[stage.name]), f"[{number}/{len(stages)}] {stage.name}"
        if state == "done":
            logger.info("%s: done earlier, kept", header)
            if stage.name == until:
                return
            continue
        if state == "to rerun":
            logger.info("%s: its settings, inputs or upstream stages changed; starting it afresh", header)
            for path in stage.outputs:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
            os.remove(os.path.join(work, "done", stage.name))
        resuming = any(os.path.exists(p) for p in stage.outputs)
        logger.info("%s: %s", header, "resuming what an earlier run left" if resuming else "starting")
        start, log = time.time(), os.path.join(work, "logs", f"{stage.name}.log")
        for action in stage.actions:
            run_action(action, log, stage.name)
        write_atomic(os.path.join(work, "done", stage.name), prints[stage.name] + "\n")
        logger.info("%s: done in %s", header, _clock(time.time() - start))
        if stage.name == until:
            logger.info("stopped after %s (--until); the same command without it goes on", until)
            return


def run_action(action: Action, log: str, stage: str, echo: bool = False) -> None:
    """Run one action of ``stage``, its line and output appended to ``log``; ``echo``: the
    output (a Python step's prints too) also to stdout, as it comes. A failing command
    raises WDSetupError naming its log."""
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {describe(action)}\n")
    if isinstance(action, Command):
        _run(action, log, stage, echo)
    elif echo:
        with open(log, "a", encoding="utf-8") as out, contextlib.redirect_stdout(_Tee(out, sys.stdout)):
            action()
    else:
        action()


class _Tee(io.TextIOBase):
    """A text stream written to two, each flushed at every write."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def _made_from(command: Command) -> str:
    """The record of what ``command.creates`` is made from: its line and its inputs' stamps."""
    return json.dumps({"command": command.line(), "inputs": [file_stamp(path) for path in command.inputs]}) + "\n"


def _made_earlier(command: Command) -> bool:
    if not (command.creates and os.path.isfile(command.creates) and os.path.getsize(command.creates)):
        return False
    if not command.inputs:
        return True
    try:
        with open(command.creates + ".made", encoding="utf-8") as f:
            return f.read() == _made_from(command)
    except OSError:
        return False


def _run(command: Command, log: str, stage: str, echo: bool) -> None:
    if _made_earlier(command):
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"(kept: {command.creates} was made earlier{' from the same inputs' if command.inputs else ''})\n")
        return
    written = command.output or command.stdout
    argv = [str(c) for c in command.argv]
    with open(log, "a", encoding="utf-8") as log_file, \
            open(written + ".tmp", "w", encoding="utf-8") if written else contextlib.nullcontext() as file:
        # where stdout and stderr go; what goes to the log goes to stdout too with echo
        streams = {"stdout": file or log_file, "stderr": subprocess.STDOUT if not command.stdout else log_file}
        piped = "stdout" if echo and not written else "stderr" if echo and command.stdout else None
        if piped:
            streams[piped] = subprocess.PIPE
        process = subprocess.Popen(argv, text=True, errors="replace", bufsize=1, **streams)
        if piped:
            tee = _Tee(log_file, sys.stdout)
            for line in getattr(process, piped):
                tee.write(line)
        code = process.wait()
    if code != 0:
        where = command.output + ".tmp" if command.output else log
        raise WDSetupError(
            f"stage {stage}: `{command.line()[:300]}` failed (exit {code}); its output is in "
            f"{where}. Fix: what it says there; then run the same command again: finished "
            "stages are kept and this one resumes")
    if written:
        os.replace(written + ".tmp", written)
    if command.creates and command.inputs:
        write_atomic(command.creates + ".made", _made_from(command))


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
