"""`python -m spectra.<entrypoint>` as a real process, without paying a fresh interpreter's imports each time.

A fresh interpreter spends ~10 s of CPU on this project's 2-core machine importing torch, transformers and Hydra
before Spectra runs a line; the suite starts dozens of processes (signals, kills, locks, W&B, sweeps). Here each test
process (an xdist worker), as it starts, imports Spectra's entrypoints and forks a server that runs nothing; each
process a test asks for is forked from that server: a process of its own (its pid, signals, exit status, file
descriptors, environment and working folder) that runs the module as `python -m` does (runpy, `sys.argv[0]` the
module's file), then ends as an interpreter does (non-daemon threads joined, atexit handlers run). The server reaps
it and writes its wait status to a file, which `Process.poll` reads, so a child killed by a signal reports -signum
as subprocess.Popen does. The imports are paid once per worker, which needs them for its own tests anyway.

The server is forked in pytest_configure (conftest), before pytest has started a thread, run a test or caught a
log record or warning; it then drops what it inherited of pytest (its file descriptors, its import hook, execnet's
exit handler, faulthandler), so that what it forks starts as a fresh interpreter would.

What a fork cannot give falls back to a fresh interpreter: an environment that differs from the server's in a
variable read at import time (anything but SPECTRA_*, WANDB_*, PYTEST_*, TOKENIZERS_PARALLELISM, NETRC), or a test
about the interpreter's own start (signals during imports): those start `sys.executable -m` as before.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CALL_TIME_VARIABLES = ("SPECTRA_", "WANDB_", "TOKENIZERS_PARALLELISM", "PYTEST_", "NETRC")  # NETRC: W&B's, at login
# Set in the test process by libraries as they run, never by a test: polars its allocator's settings on import,
# torch's inductor its cache folder and a pointer for its compiled wrappers on first use. Once a test had run Spectra
# in-process, every later process request of that worker differed from the server's environment in these and
# started a fresh interpreter (~10 s) instead of a fork (~2 s).
SELF_SET_VARIABLES = ("_RJEM_MALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")
MODULES = ("spectra.run", "spectra.analyze", "spectra.prepare", "spectra.sql")


# ---- the server (forked from the test process) ------------------------------------------------------------


def serve(requests, replies) -> None:
    statuses: dict[int, str] = {}

    def reap(_signum, _frame) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            path = statuses.pop(pid)
            Path(path + ".tmp").write_text(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)

    signal.signal(signal.SIGCHLD, reap)
    for line in requests:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # the child's status path is known before reap
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            child(request)
        statuses[pid] = request["status"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        replies.write(f"{pid}\n")
        replies.flush()


def leave_the_test_process(inherited_fds: set[int]) -> None:
    """In the forked server: drop what pytest (and xdist's execnet) set up in the process it was forked from."""
    import atexit
    import faulthandler

    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for fd in inherited_fds - {0, 1, 2}:  # execnet's pipes to the pytest controller, pytest's capture files
        try:
            os.close(fd)
        except OSError:
            pass
    sys.stdin, sys.stdout, sys.stderr = (open(fd, mode, closefd=False) for fd, mode in ((0, "r"), (1, "w"), (2, "w")))
    faulthandler.disable()
    sys.meta_path[:] = [finder for finder in sys.meta_path if not type(finder).__module__.startswith("_pytest")]
    execnet = sys.modules.get("execnet")
    if execnet is not None:
        atexit.unregister(execnet.default_group._cleanup_atexit)


def warm() -> None:
    """What every child would otherwise load on its own, ~2 s of a tiny run's ~3.5 s here: pandas (pyarrow
    imports it on first use), the test models' modeling code, and the test models' tokenizer (into
    spectra.models.loading's per-process cache). Nothing that starts a thread: a fork copies only the thread
    that calls it, and a thread pool (torch's OpenMP, a tokenizer's) started before the fork breaks in the child."""
    import pandas  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.pandas_compat  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    from hydra import compose, initialize_config_dir

    from spectra.config.paths import config_dir
    from spectra.models.loading import load_tokenizer

    for family in ("llama", "gemma2", "gemma3", "mistral", "qwen2", "gpt_neox"):
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        load_tokenizer(compose(config_name="config", overrides=["model=tiny_llama"]).model, None)


def child(request: dict) -> None:
    """Runs in the forked process; never returns."""
    import runpy
    import traceback

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    code = 1
    try:
        os.dup2(os.open(request["stdin"], os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY), 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["argv"]]
        sys.orig_argv = [sys.executable, "-m", request["module"], *request["argv"]]  # what was typed, as Spectra reads it
        import spectra  # what spectra/__init__.py does when sys.orig_argv names one of its entrypoints
        from spectra import crashpoints

        sys.excepthook = spectra._interrupted_while_starting
        crashpoints._TARGET = crashpoints._target()  # the test hook reads SPECTRA_CRASH_AT at import: again here
        sys.modules.pop(request["module"], None)  # run as __main__ only, as `python -m` does (runpy would warn)
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:
            traceback.print_exc()
        threading._shutdown()  # as the interpreter ends: join non-daemon threads, then atexit
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# ---- the client (in the test process) ------------------------------------------------------------------------


class Process:
    """The part of subprocess.Popen the tests use, for a process forked by the server (text mode, pipes)."""

    def __init__(self, pid: int, folder: Path, discard_stdout: bool = False):
        self.pid, self.args, self.returncode, self._folder = pid, None, None, folder
        # Each open blocks until the child opens its end, which it does first.
        self.stdout = None if discard_stdout else open(folder / "stdout")
        self.stderr = open(folder / "stderr")

    def poll(self) -> int | None:
        status = self._folder / "status"
        if self.returncode is None and status.exists():
            self.returncode = int(status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        out: list[str] = []
        if self.stdout is not None:
            reader = threading.Thread(target=lambda: out.append(self.stdout.read()), daemon=True)
            reader.start()
        err = self.stderr.read()
        if self.stdout is not None:
            reader.join(timeout)
        self.wait(timeout)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self.stdout is None:
            return None, err  # as Popen with stdout=DEVNULL
        return (out[0] if out else ""), err


class Server:
    """This process's server, forked from it here once it has imported Spectra: call before any thread starts."""

    def __init__(self):
        self.env = dict(os.environ)  # what the server imported with
        inherited = {int(fd) for fd in os.listdir("/proc/self/fd")}
        for module in MODULES:
            importlib.import_module(module)
        warm()
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(requests_write)
                os.close(replies_read)
                leave_the_test_process(inherited - {requests_read, replies_write})  # listdir's fd may be reused
                serve(os.fdopen(requests_read), os.fdopen(replies_write, "w"))
            finally:
                os._exit(0)
        os.close(requests_read)
        os.close(replies_write)
        self.requests, self.replies = os.fdopen(requests_write, "w"), os.fdopen(replies_read)
        self.lock = threading.Lock()
        self.folder = tempfile.mkdtemp(prefix="spectra-prestarted-")  # each child's pipes and status file

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:  # reaped by an earlier call
            return False

    def import_time_differences(self, env: dict[str, str]) -> list[str]:
        """The variables in which env differs from the server's that a process may read as it starts."""
        changed = {name for name in env.keys() | self.env.keys() if env.get(name) != self.env.get(name)}
        return sorted(name for name in changed - set(SELF_SET_VARIABLES) if not name.startswith(CALL_TIME_VARIABLES))

    def start(self, module: str, argv, cwd, env: dict[str, str], stdin: str | None = None,
              discard_stdout: bool = False) -> Process:
        folder = Path(tempfile.mkdtemp(prefix="spectra-prestarted-", dir=self.folder))
        os.mkfifo(folder / "stdout")
        os.mkfifo(folder / "stderr")
        (folder / "stdin").write_text(stdin or "")
        request = {"module": module, "argv": list(argv), "cwd": str(cwd), "env": env, "status": str(folder / "status"),
                   **{name: str(folder / name) for name in ("stdin", "stdout", "stderr")}}  # fmt: skip
        if discard_stdout:
            request["stdout"] = os.devnull
        with self.lock:
            self.requests.write(json.dumps(request) + "\n")
            self.requests.flush()
            pid = int(self.replies.readline())
        process = Process(pid, folder, discard_stdout)
        process.args = [sys.executable, "-m", module, *argv]
        return process

    def close(self) -> None:
        import shutil

        self.requests.close()  # the server's loop ends
        if self.alive():
            os.waitpid(self.pid, 0)
        shutil.rmtree(self.folder, ignore_errors=True)
