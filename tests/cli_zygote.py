"""A fork server ("zygote") for the tests' console-script runs: one Python process that has
imported torch and fairseq once, and forks a fresh run of a console script per request, so
that a run costs what the command does rather than ~6 s of imports.

:class:`Zygote` is the client (``conftest.run_cli``); run as a script, this file is the server:
it imports :data:`PRELOAD`, listens on the Unix socket named by its argument, prints
``ready``, and exits when its stdin closes (the pytest worker stopped it or died). A request
is an argv (the console script's path first), an environment and a working directory, with
the open files for the run's stdout and stderr passed along (SCM_RIGHTS); the server forks a
child that takes them as fds 0-2 (stdin: /dev/null), sets ``os.environ``, ``sys.argv`` and
``sys.path[0]`` as that script started by the kernel would, runs the script as ``__main__``
(so multiprocessing's spawn re-imports it, as it does the real one), shuts down as the
interpreter does (threads, atexit, flush), and the server answers with its exit status.

Not imported here, so each run imports them fresh: ``fairseq_cli`` (its modules set up
logging at import) and ``wd_fairseq`` (tests pass ``--user-dir <repo>/wd_fairseq``, which
fairseq refuses once a package of that name came from elsewhere).
"""

import atexit
import builtins
import importlib
import json
import logging
import os
import random
import re
import runpy
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import traceback

#: What a run would otherwise import first: the libraries behind nearly all of its start-up.
PRELOAD = ("numpy", "torch", "omegaconf", "hydra", "sacrebleu", "fairseq", "fairseq.checkpoint_utils",
           "fairseq.data", "fairseq.distributed", "fairseq.logging.progress_bar", "fairseq.models.transformer",
           "fairseq.options", "fairseq.sequence_generator", "fairseq.tasks.translation", "fairseq.trainer",
           "ctranslate2")

#: Environment variables read when the interpreter starts or those libraries are imported: a
#: request whose value differs from the zygote's runs as a real subprocess.
IMPORT_TIME = re.compile(r"PYTHON|LANG|LC_|TMP|TEMP|HOME$|XDG_|OMP_|KMP_|GOMP_|MKL_|OPENBLAS_|"
                         r"NPY_|CT2_|TORCH|PYTORCH|CUDA|NCCL|LD_|MALLOC|LOCAL_RANK$")


class Zygote:
    """The client: starts the server with environment ``env`` and runs commands through it."""

    def __init__(self, env: dict):
        self.env = env
        self.directory = tempfile.mkdtemp(prefix="cli-zygote-")
        self.socket = os.path.join(self.directory, "socket")
        self.server = subprocess.Popen([sys.executable, __file__, self.socket], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
        self.ready = self.server.stdout.readline() == "ready\n"
        self.server.stdout.close()

    def serves(self, env: dict) -> bool:
        """Whether a run under ``env`` behaves as in a fresh interpreter."""
        return self.ready and not any(IMPORT_TIME.match(name) and env.get(name) != self.env.get(name)
                                      for name in env.keys() | self.env.keys())

    def run(self, argv: list, env: dict, cwd) -> "subprocess.CompletedProcess | None":
        """``subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)`` in a
        fork; None where the server refused (the caller runs a real subprocess)."""
        cwd = os.path.abspath(cwd or os.curdir)
        if not os.path.isdir(cwd):
            return None  # subprocess.run raises
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd})
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
                socket.socket(socket.AF_UNIX) as connection:
            try:
                connection.connect(self.socket)
            except OSError:
                self.ready = False
                return None
            socket.send_fds(connection, [request.encode()], [out.fileno(), err.fileno()])
            connection.shutdown(socket.SHUT_WR)
            answer = json.loads(receive_all(connection) or "null")
            if answer is None:
                raise RuntimeError(f"the CLI zygote died while running {argv}")
            if "refused" in answer:
                return None
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, answer["returncode"], out.read(), err.read())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def receive_all(connection, data: bytes = b"") -> bytes:
    while chunk := connection.recv(1 << 16):
        data += chunk
    return data


def serve(path: str) -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # ctranslate2 is an optional dependency
            pass
    fairseq_logging = logging.root.handlers[:], logging.root.level
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        print("ready", flush=True)
        while listener in select.select([listener, sys.stdin], [], [])[0]:
            connection = listener.accept()[0]
            with connection:
                answer(connection, listener, fairseq_logging)
        os.unlink(path)


def answer(connection, listener, fairseq_logging) -> None:
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 2)
    request = json.loads(receive_all(connection, data))
    # Fork only a single-threaded process (its native threads counted: torch's, OpenMP's).
    if len(os.listdir("/proc/self/task")) != 1 or logging.root.handlers:
        connection.sendall(b'{"refused": "threads or logging set up in the zygote"}')
        return
    pid = os.fork()
    if pid == 0:
        try:
            connection.close()
            listener.close()
            os._exit(fresh_run(request, fds, fairseq_logging))
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    status = os.waitpid(pid, 0)[1]
    connection.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())


def fresh_run(request: dict, fds: list, fairseq_logging) -> int:
    """In the forked child: the console script's run, as in a new interpreter; its exit code."""
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (fds[0], 1), (fds[1], 2)):
        os.dup2(fd, target)
        os.close(fd)
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        script = sys.argv[0]
        sys.path[0] = os.path.dirname(script)
        reseed()
        on_first_fairseq_import(*fairseq_logging)
        code = exit_code(script)
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def reseed() -> None:
    """Fresh random states (a new interpreter draws them from the OS), not the zygote's."""
    import numpy
    import torch

    random.seed()
    numpy.random.seed()
    torch.seed()


def on_first_fairseq_import(handlers, root_level) -> None:
    """Importing fairseq calls ``logging.basicConfig(level=DEBUG)`` (its wav2vec2 models): a
    fresh run gets that root logger set-up at its first fairseq import unless it has set up
    logging before (fairseq_cli.train does, on stdout). The zygote took it off after its imports;
    this puts it back at that moment of the run."""
    real_import = builtins.__import__

    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.partition(".")[0] == "fairseq":
            builtins.__import__ = real_import
            if not logging.root.handlers:
                logging.root.handlers[:] = handlers
                logging.root.setLevel(root_level)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = import_


def exit_code(script: str) -> int:
    """Run ``script`` as ``__main__``; the exit code the interpreter would give its end."""
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException as error:
        trace = error.__traceback__  # from the script's frame on, as Python prints it
        while trace and trace.tb_frame.f_code.co_filename != script:
            trace = trace.tb_next
        error.__traceback__ = trace or error.__traceback__
        sys.excepthook(type(error), error, error.__traceback__)
        return 1
    return 0


if __name__ == "__main__":
    serve(sys.argv[1])
