"""The zygote (cli_zygote.py): a console script forked from it gives the exit code, stdout and
stderr that the same command run as a subprocess gives; a script's stand-in on PATH
(cli_shim.py) runs it forked with its caller's files, exit status and signals; so does the
stand-in for ``python SCRIPT.py``."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli_shim
import pytest
from cli_zygote import Zygote
from conftest import BIN, cli_env, zygote_for


@pytest.fixture(scope="module")
def zygote():
    server = Zygote(cli_env())
    assert server.ready
    yield server
    server.close()


def forked(zygote, tool, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    env = {**cli_env(), **(env or {})}
    assert zygote.serves(env)
    return zygote.run([str(BIN / tool), *map(str, args)], env, cwd)


def same_as_subprocess(zygote, tool, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the command forked, then as a subprocess (each in its own new directory under
    ``cwd``, if given), check that both give the same results, and return the forked one's."""
    if cwd:
        (cwd / "forked").mkdir()
        (cwd / "real").mkdir()
    fork = forked(zygote, tool, *args, env=env, cwd=cwd and cwd / "forked")
    real = subprocess.run(fork.args, capture_output=True, text=True, env={**cli_env(), **(env or {})},
                          cwd=cwd and cwd / "real")
    assert [fork.returncode, untimed(fork.stdout), untimed(fork.stderr)] == \
        [real.returncode, untimed(real.stdout), untimed(real.stderr)]
    return fork


def untimed(log: str) -> str:
    return re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<time>", log, flags=re.M)


def test_help_and_a_refused_input_are_those_of_a_subprocess(zygote, tmp_path):
    """And the environment reaches the run: COLUMNS sets argparse's width."""
    narrow = same_as_subprocess(zygote, "wd-kd-data", "--help", env={"COLUMNS": "60"}).stdout
    wide = forked(zygote, "wd-kd-data", "--help", env={"COLUMNS": "200"}).stdout
    assert "usage: wd-kd-data" in narrow
    assert max(map(len, narrow.splitlines())) < 100 < max(map(len, wide.splitlines()))
    refused = same_as_subprocess(zygote, "wd-materialize", tmp_path / "missing.pt", tmp_path / "out.pt")
    assert refused.returncode == 1 and "missing.pt" in refused.stderr


def test_a_logged_run_in_a_working_directory_is_that_of_a_subprocess(zygote, raw_corpus, tmp_path):
    """A relative --destdir is in cwd; fairseq-preprocess logs through the handler fairseq's
    import gives the root logger (on stderr: the zygote's imports must not keep it)."""
    logged = same_as_subprocess(zygote, "fairseq-preprocess", "--source-lang", "src", "--only-source",
                                "--trainpref", raw_corpus / "train", "--destdir", "bin", cwd=tmp_path)
    assert "INFO:fairseq_cli.preprocess:Wrote preprocessed data to bin" in logged.stderr
    assert (tmp_path / "forked" / "bin" / "dict.src.txt").is_file()


def test_interpreter_settings_and_other_tools_run_as_subprocesses(zygote):
    assert zygote_for("torchrun") is None
    assert not zygote.serves({**cli_env(), "PYTHONPATH": "/elsewhere"})
    assert not zygote.serves({**cli_env(), "OMP_NUM_THREADS": "2"})
    assert zygote.serves({**cli_env(), "WD_SOMETHING": "1"})
    assert zygote.serves({**cli_env(), "TORCHINDUCTOR_CACHE_DIR": "/tmp/x", "PYTHONFAULTHANDLER": "1"})


PROBE = """#!{python}
import os, signal, sys, time
if sys.argv[1:] == ["wait"]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    open(sys.argv[0] + ".pid", "w").write(str(os.getpid()))
    time.sleep(60)
if sys.argv[1] == "child":  # its own child, started by sys.executable
    import faulthandler, subprocess
    print(faulthandler.is_enabled(), flush=True)
    sys.exit(subprocess.run([sys.executable, sys.argv[0], "5"], input="from child", text=True).returncode)
if sys.argv[1] == "cat":
    print(open(sys.argv[2]).read().strip(), "torch" in sys.modules)
    sys.exit(0)
print("preloaded", "torch" in sys.modules, sys.stdin.read().strip(), os.environ["PROBE"])
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def stand_ins(zygote, tmp_path):
    """A PATH whose ``fairseq-probe`` is a stand-in (cli_shim.py) for a probe script that
    tells whether it started with torch imported (a fork of the zygote) and echoes stdin."""
    real, shims = tmp_path / "real", tmp_path / "shims"
    real.mkdir()
    shims.mkdir()
    (real / "fairseq-probe").write_text(PROBE.format(python=sys.executable))
    (real / "fairseq-probe").chmod(0o755)
    (real / "probe.py").write_text(PROBE.format(python=sys.executable))
    (real / "python").symlink_to(sys.executable)
    cli_shim.install(str(shims), str(real), ["fairseq-probe", "python"])
    return {**cli_env(), "PATH": f"{shims}:{os.environ['PATH']}", "WD_TESTS_REAL_BIN": str(real),
            "WD_TESTS_ZYGOTE": zygote.socket, "PROBE": "from env"}, real / "fairseq-probe"


def test_a_script_on_path_runs_forked_with_the_callers_files_and_status(stand_ins):
    env, _ = stand_ins
    line = "echo hello | fairseq-probe 3; echo status $?"
    forked = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env)
    assert forked.stdout == "preloaded True hello from env\nstatus 3\n"
    real = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                          env={**env, "WD_TESTS_SUBPROCESS": "1"})
    assert real.stdout == "preloaded False hello from env\nstatus 3\n"
    refused = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                             env={**env, "OMP_NUM_THREADS": "2"})  # (read at torch's import)
    assert refused.stdout == real.stdout


def test_python_runs_a_script_forked_and_anything_else_as_itself(stand_ins):
    env, probe = stand_ins
    script = probe.parent / "probe.py"
    line = f"echo hi | python {script} 4; echo status $?; python -c 'import sys; print(\"torch\" in sys.modules)'"
    forked = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env)
    assert forked.stdout == "preloaded True hi from env\nstatus 4\nFalse\n"
    # a file only the caller has open (bash's process substitution, /dev/fd/N) reaches the run
    line = f"python {script} cat <(echo substituted)"
    assert subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env).stdout == "substituted True\n"
    # its sys.executable is the stand-in, so a child it starts by it is a fork too; the fork
    # applies PYTHONFAULTHANDLER itself
    line = f"python {script} child; echo status $?"
    child = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                           env={**env, "PYTHONFAULTHANDLER": "1"})
    assert child.stdout == "True\npreloaded True from child from env\nstatus 5\n"


def test_signals_reach_the_forked_run_and_a_killed_caller_takes_it_along(stand_ins):
    env, probe = stand_ins
    pid_file = Path(f"{probe}.pid")
    for signal_, expected in ((signal.SIGTERM, 7), (signal.SIGKILL, -signal.SIGKILL)):
        pid_file.unlink(missing_ok=True)
        caller = subprocess.Popen(["fairseq-probe", "wait"], env=env)
        run = wait_for(lambda: pid_file.exists() and pid_file.read_text())
        assert int(run) != caller.pid  # a fork of the zygote, not the caller's process
        caller.send_signal(signal_)
        assert caller.wait(timeout=30) == expected
        assert wait_for(lambda: not Path(f"/proc/{run}").exists() or "Z" in stat_of(run))


def stat_of(pid: str) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


def wait_for(condition, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")
