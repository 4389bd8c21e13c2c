"""A console script's stand-in on the tests' ``PATH``: runs the real script of the same name
(in ``WD_TESTS_REAL_BIN``; for ``python SCRIPT.py ARGS``, SCRIPT, whose ``sys.executable`` is
then this stand-in) as a fork of the CLI zygote at ``WD_TESTS_ZYGOTE`` (cli_zygote.py), with
this process's open files (stdin, stdout, stderr and any other it inherited, such as bash's
``<(...)``), working directory and environment; forwards the signals it gets to that run and
ends as it ended (its exit code, or killed by the same signal). Where the zygote refuses or
cannot be reached, or ``WD_TESTS_SUBPROCESS=1``, it becomes the real script (exec).
:func:`install` writes the stand-ins: each starts ``python -I -S`` (the standard library only:
a few milliseconds) and calls :func:`main`."""

import os
import signal
import sys

from cli_zygote import read_answer, request  # (the standard library only)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main() -> None:
    real = os.path.join(os.environ["WD_TESTS_REAL_BIN"], os.path.basename(sys.argv[0]))
    argv = real_argv = [real, *sys.argv[1:]]
    executable = None
    if os.path.basename(real) == "python":  # python SCRIPT.py ARGS forks SCRIPT; any other form is real
        script = sys.argv[1] if len(sys.argv) > 1 else ""
        argv = [script, *sys.argv[2:]] if script.endswith(".py") and os.path.isfile(script) else None
        executable = os.path.abspath(sys.argv[0])  # SCRIPT's children by sys.executable: stand-ins too
    path = os.environ.get("WD_TESTS_ZYGOTE")
    if argv and path and os.environ.get("WD_TESTS_SUBPROCESS") != "1":
        connection = request(path, argv, dict(os.environ), os.getcwd(), {fd: fd for fd in inherited()},
                             executable)
        if connection is not None:
            buffer = bytearray()
            answer = read_answer(connection, buffer)
            if answer is not None and "pid" in answer:
                pid = answer["pid"]
                for number in FORWARDED:
                    signal.signal(number, lambda number, _: os.kill(pid, number))
                answer = read_answer(connection, buffer)
                if answer is None:
                    sys.exit(f"{os.path.basename(real)}: the CLI zygote died during the run")
            if answer is not None and "returncode" in answer:
                code = answer["returncode"]
                if code < 0:  # killed: so is this process, by the same signal
                    signal.signal(-code, signal.SIG_DFL)
                    os.kill(os.getpid(), -code)
                sys.exit(code)
    os.execv(real, real_argv)


def inherited() -> list:
    """The fds this process got from its caller (what an exec would pass on: inheritable)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                found.append(int(name))
        except OSError:  # (the listing's own fd, closed by now)
            pass
    return sorted(found)


def install(directory: str, real_bin: str, tools: list) -> None:
    """Write a stand-in for each of ``tools`` (names of scripts in ``real_bin``) into ``directory``."""
    here = os.path.dirname(os.path.abspath(__file__))
    for tool in tools:
        path = os.path.join(directory, tool)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {here!r})\n"
                    "import cli_shim\ncli_shim.main()\n")
        os.chmod(path, 0o755)
