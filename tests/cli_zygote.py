"""A fork server ("zygote") for the tests' console-script runs: one Python process that has
imported torch and fairseq once, and forks a fresh run of a console script per request, so
that a run costs what the command does rather than ~6 s of imports.

Two kinds of client. :class:`Zygote` (``conftest.run_cli``) runs a command and captures its
output. The shims (``cli_shim.py``), put first on the ``PATH`` of every process the tests
start, stand for the ``fairseq-*`` and ``wd-*`` scripts: a recipe's, a study's or
``wd-distill``'s own calls of those tools go to the zygote too, with the shim's stdin, stdout
and stderr, its exit status and the signals it gets.

Run as a script, this file is the server: it imports :data:`PRELOAD`, listens on the Unix
socket named by its argument, prints ``ready``, and exits when its stdin closes (the pytest
worker stopped it or died), killing the runs still going. A request (a 4-byte length, then
JSON) is an argv (the console script's path first), an environment, a working directory and
the fd numbers of the open files passed along (SCM_RIGHTS): the run's stdin, stdout and
stderr, and (from a stand-in) the other files its caller left open to it, such as bash's
``<(...)``. A
request whose environment differs from the server's in what is read at start-up
(:data:`IMPORT_TIME`) is refused: the client runs a real process. Otherwise the server forks
a child that takes the files under their numbers, sets ``os.environ``, ``sys.argv`` and
``sys.path[0]`` as that script started by the kernel would, runs the script as ``__main__``
(so multiprocessing's spawn re-imports it, as it does the real one) and shuts down as the
interpreter does (threads, atexit, flush). The server answers ``{"pid": N}`` at the fork and
``{"returncode": C}`` at the child's end, one JSON line each, and serves other requests
meanwhile (a forked ``wd-distill`` runs its stages' tools through shims, so through here). A
client that goes away (killed) takes its run with it: the server SIGKILLs the child.

Not imported here, so each run imports them fresh: ``fairseq_cli`` (its modules set up
logging at import) and ``wd_fairseq`` (tests pass ``--user-dir <repo>/wd_fairseq``, which
fairseq refuses once a package of that name came from elsewhere).
"""

import atexit
import builtins
import faulthandler
import fcntl
import importlib
import json
import logging
import os
import random
import re
import runpy
import select
import shutil
import signal
import socket
import struct
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

#: The most open files a request passes (the kernel's limit for one message: 253).
MAX_FDS = 253

#: Environment variables read when the interpreter starts or those libraries are imported: a
#: request whose value differs from the zygote's runs as a real subprocess. (``PYTHON`` alone,
#: the recipes' interpreter setting, is not one of them; ``PYTHONFAULTHANDLER`` the fork applies;
#: ``TORCHINDUCTOR_CACHE_DIR``, which torch's profiler sets to its default, is read when used.)
IMPORT_TIME = re.compile(r"PYTHON(?!FAULTHANDLER$).|LANG|LC_|TMP|TEMP|HOME$|XDG_|OMP_|KMP_|GOMP_|MKL_|OPENBLAS_|"
                         r"NPY_|CT2_|TORCH(?!INDUCTOR_CACHE_DIR$)|PYTORCH|CUDA|NCCL|LD_|MALLOC|LOCAL_RANK$")


def differs_at_import(env: dict, base: dict) -> bool:
    """Whether a run under ``env`` would start otherwise than one under ``base``."""
    return any(IMPORT_TIME.match(name) and env.get(name) != base.get(name) for name in env.keys() | base.keys())


def request(path: str, argv: list, env: dict, cwd: str, files: dict, executable=None):
    """Send a run to the server at ``path``; ``files``: {fd number in the run: open file or
    fd here}; ``executable``: the run's ``sys.executable`` (default: the server's). The
    connection, or None where the server cannot be reached."""
    connection = socket.socket(socket.AF_UNIX)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    data = json.dumps({"argv": argv, "env": env, "cwd": cwd, "fds": list(files),
                       "executable": executable}).encode()
    data = struct.pack("!I", len(data)) + data
    fds = [f.fileno() if hasattr(f, "fileno") else f for f in files.values()]
    sent = socket.send_fds(connection, [data], fds)
    if sent < len(data):  # (not sendall(b""): it still sends, and fails once a refusal closed the socket)
        connection.sendall(data[sent:])
    return connection


def read_answer(connection, buffer: bytearray):
    """The server's next JSON line, or None where it closed the connection first."""
    while b"\n" not in buffer:
        chunk = connection.recv(4096)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


class Zygote:
    """The client of ``run_cli``: starts the server with environment ``env`` and runs
    commands through it, their output captured."""

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
        return self.ready and not differs_at_import(env, self.env)

    def run(self, argv: list, env: dict, cwd) -> "subprocess.CompletedProcess | None":
        """``subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)`` in a
        fork; None where the server refused (the caller runs a real subprocess)."""
        cwd = os.path.abspath(cwd or os.curdir)
        if not os.path.isdir(cwd):
            return None  # subprocess.run raises
        with open(os.devnull) as null, tempfile.TemporaryFile("w+") as out, \
                tempfile.TemporaryFile("w+") as err:
            connection = request(self.socket, argv, env, cwd, {0: null, 1: out, 2: err})
            if connection is None:
                self.ready = False
                return None
            with connection:
                buffer = bytearray()
                answer = read_answer(connection, buffer)
                if answer is not None and "pid" in answer:
                    answer = read_answer(connection, buffer)
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


class Server:
    """The zygote's loop: accept requests, fork runs, answer at their end."""

    def __init__(self, path: str, env: dict):
        self.env = env  # as the server started (imports add KMP_* variables)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(64)
        self.runs = {}  # pid -> the connection of its client
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # (wakes select through the wakeup fd)

    def serve(self, fairseq_logging) -> None:
        print("ready", flush=True)
        while True:
            waiting = [self.listener, sys.stdin, self.wakeup_r, *self.runs.values()]
            try:
                readable = select.select(waiting, [], [])[0]
            except InterruptedError:
                continue
            if sys.stdin in readable:
                break
            if self.wakeup_r in readable:
                os.read(self.wakeup_r, 1 << 12)
                self.reap()
            for pid, connection in list(self.runs.items()):
                if connection in readable:  # the client closed or died: so does its run
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if self.listener in readable:
                self.accept(fairseq_logging)
        for pid in self.runs:
            os.kill(pid, signal.SIGKILL)

    def reap(self) -> None:
        while self.runs:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            connection = self.runs.pop(pid, None)
            if connection is not None:
                with connection:
                    try:
                        connection.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                    except OSError:
                        pass

    def accept(self, fairseq_logging) -> None:
        connection = self.listener.accept()[0]
        connection.settimeout(10)
        try:
            data, fds, _, _ = socket.recv_fds(connection, 1 << 16, MAX_FDS)
            data = bytearray(data)
            while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
                chunk = connection.recv(1 << 16)
                if not chunk:
                    raise OSError("the request ended early")
                data += chunk
            connection.settimeout(None)
        except OSError:
            connection.close()
            return
        request = json.loads(data[4:])
        # Fork only a single-threaded process (its native threads counted: torch's, OpenMP's).
        if differs_at_import(request["env"], self.env) or not os.path.isdir(request["cwd"]) \
                or len(fds) != len(request["fds"]) \
                or len(os.listdir("/proc/self/task")) != 1 or logging.root.handlers:
            with connection:
                connection.sendall(b'{"refused": "other start-up settings, or threads in the zygote"}\n')
            for fd in fds:
                os.close(fd)
            return
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for held in (self.listener, connection, *self.runs.values()):
                    held.close()
                os.close(self.wakeup_r)
                os.close(self.wakeup_w)
                os._exit(fresh_run(request, fds, fairseq_logging))
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        self.runs[pid] = connection
        try:
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except OSError:
            pass  # the client went away: the loop sees it


def serve(path: str) -> None:
    env = dict(os.environ)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # ctranslate2 is an optional dependency
            pass
    fairseq_logging = logging.root.handlers[:], logging.root.level
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    server = Server(path, env)
    server.serve(fairseq_logging)
    os.unlink(path)


def fresh_run(request: dict, fds: list, fairseq_logging) -> int:
    """In the forked child: the console script's run, as in a new interpreter; its exit code."""
    targets = request["fds"]
    floor = max([*targets, *fds, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]  # (out of the targets' way)
    for fd in fds:
        os.close(fd)
    for fd, target in zip(moved, targets):
        os.dup2(fd, target)
        os.close(fd)
    for target in {0, 1, 2} - set(targets):
        os.dup2(os.open(os.devnull, os.O_RDWR), target)
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        sys.executable = request.get("executable") or sys.executable
        if os.environ.get("PYTHONFAULTHANDLER"):
            faulthandler.enable()
        else:
            faulthandler.disable()
        script = sys.argv[0]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
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
