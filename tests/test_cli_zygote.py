"""The zygote (cli_zygote.py): a console script forked from it gives the exit code, stdout and
stderr that the same command run as a subprocess gives."""

import re
import subprocess

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
    assert zygote_for("torchrun", cli_env()) is None
    assert not zygote.serves({**cli_env(), "PYTHONPATH": "/elsewhere"})
    assert not zygote.serves({**cli_env(), "OMP_NUM_THREADS": "2"})
    assert zygote.serves({**cli_env(), "WD_SOMETHING": "1"})
