"""Readable logs (wd_fairseq/quiet_logs.py, run at start-up by the installed
wd_fairseq.pth): the known library noise is gone from our console scripts and fairseq's
commands, and every other warning or log record still shows."""

import subprocess
import sys

from conftest import run_cli


def test_console_scripts_start_without_the_tensorboardx_line():
    for tool in ("wd-materialize", "wd-kd-data", "wd-evaluate", "fairseq-train"):
        proc = run_cli(tool, "--help")
        assert "tensorboardX" not in proc.stdout + proc.stderr, tool
        assert "usage:" in proc.stdout, tool


def test_hydra_deprecations_are_silenced_and_real_warnings_are_not():
    """The exact hydra messages fairseq triggers are dropped; a UserWarning with another
    message, a warning from the same logger and an error still show."""
    code = """
import logging, warnings
logging.basicConfig(level=logging.INFO)
warnings.warn("hydra.experimental.initialize() is no longer experimental. Use hydra.initialize()")
warnings.warn("\\nThe strict flag in the compose API is deprecated.\\nSee ...")
warnings.warn("`torch.cuda.amp.autocast(args...)` is deprecated. Please use ...", FutureWarning)
warnings.warn("a real problem")
warnings.warn("a real FutureWarning", FutureWarning)
log = logging.getLogger("fairseq.tasks.text_to_speech")
log.info("Please install tensorboardX: pip install tensorboardX")
log.warning("another message of that logger")
logging.getLogger("hydra.core.utils").debug("Setting JobRuntime:name=UNKNOWN_NAME")
logging.getLogger("x").error("an error")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    err = proc.stderr
    assert "no longer experimental" not in err and "strict flag" not in err
    assert "tensorboardX" not in err and "JobRuntime" not in err
    assert "autocast" not in err
    assert "UserWarning: a real problem" in err and "FutureWarning: a real FutureWarning" in err
    assert "another message of that logger" in err and "an error" in err
