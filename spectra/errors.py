"""Errors meant for people: the entrypoints print them as one line and exit with status 2, no traceback."""

import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class SpectraError(Exception):
    """A problem with the user's config, inputs or environment (not a bug in Spectra)."""


class ConfigError(SpectraError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


# Faults of the machine, not of Spectra or the config: each ends a run with one line saying what to do.
DISK_FAULTS = {28: "the disk is full", 30: "the filesystem is read-only", 122: "the disk quota is exceeded"}


def disk_fault(error: BaseException) -> str | None:
    """'the disk is full (writing <file>)' for ENOSPC, EROFS, EDQUOT, else None (a bug: let it raise).

    pyarrow reports these as OSError without errno, so its message text is read as well."""
    if not isinstance(error, OSError):
        return None
    text = str(error)
    for number, what in DISK_FAULTS.items():
        if error.errno == number or os.strerror(number) in text:
            where = f" (writing {error.filename})" if error.filename else ""
            return what + where
    return None


@contextmanager
def ends_in_one_line(after_disk_fault: Callable[[], str], after_interrupt: Callable[[], str]) -> Iterator[None]:
    """An entrypoint's body: a SpectraError, a full or read-only disk, or Ctrl-C / SIGTERM ends the process with one
    'spectra:' line on stderr, status 2 (130 when interrupted), and for the last two what to do next. The advice is
    asked for only then, since it may name a folder the body chose. Any other error is a bug and raises."""
    try:
        yield
    except SpectraError as error:
        say(f"spectra: error: {error}")
        sys.exit(2)
    except OSError as error:
        if (fault := disk_fault(error)) is None:
            raise
        say(f"spectra: error: {fault}; {after_disk_fault()}")
        sys.exit(2)
    except KeyboardInterrupt as stop:
        # Under torchrun every rank gets the signal: rank 0 speaks for all, the others end quietly.
        if os.environ.get("RANK", "0") == "0":
            # stop.args, not stop: an exception is always truthy, so `stop or 'SIGINT'` printed "()" for Ctrl-C.
            say(f"spectra: interrupted ({signal_name(stop)}); {after_interrupt()}")
        sys.exit(130)


def say(line: str) -> None:
    """The one line on stderr, on a line of its own: a progress bar that a signal caught before its with-block
    could close it (it draws itself on creation) is cleared first, which tqdm.write does for every open bar."""
    from tqdm import tqdm  # here: errors.py is imported before anything heavy, and most runs never end in an error

    tqdm.write(line, file=sys.stderr)


def signal_name(stop: KeyboardInterrupt) -> str:
    """The signal behind an interrupt: the name stop_signals_as_interrupt gave it, else Ctrl-C's SIGINT."""
    return str(stop.args[0]) if stop.args else "SIGINT"


# SIGTERM: scancel, a SLURM time limit, `kill`. SIGHUP: the terminal closed, the ssh connection dropped.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind as Ctrl-C does: files in flight are finished or removed, and the entrypoint ends
    with its one 'interrupted' line (exit 130)."""

    def stop(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends, then interrupt as they would have: for a few renames
    that must happen together. (Handlers, not a signal mask: the mask is per thread, and Python runs handlers in
    the main thread whichever thread the kernel chose.) Main thread only, as signal.signal is."""
    arrived: list[int] = []
    hold = lambda number, _frame: arrived.append(number)  # noqa: E731
    previous = {number: signal.signal(number, hold) for number in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if arrived:
        raise KeyboardInterrupt(signal.Signals(arrived[0]).name)
