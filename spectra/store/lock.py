"""One writer per folder: an exclusive lock held for as long as a process writes into a run (or shard) folder.

The lock is `flock` on `<folder>/.spectra.lock`. The kernel releases it when the process ends, however it ends
(exit, exception, SIGKILL, OOM kill), so a lock left by a dead process never blocks anyone: the file stays, the
lock does not. The file's text names the current holder (pid, host, start time, command) so that a second process
can say who is in the way.

    python -m spectra.run model=tiny_llama data=synthetic hydra.run.dir=outputs/r1 &
    python -m spectra.run model=tiny_llama data=synthetic hydra.run.dir=outputs/r1 run.resume=true   # refused

Limits: flock is advisory (only Spectra honours it) and per host on some network filesystems (NFS before Linux
2.6.12, Lustre mounted without `flock`), where two nodes may both get the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from spectra.errors import ConfigError

LOCK_NAME = ".spectra.lock"


class FolderLock:
    """`with FolderLock(folder, key):` holds the folder's lock; refused with one line naming the holder."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key  # the config key that chose the folder, named in the error
        self._descriptor: int | None = None

    def __enter__(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the file may belong to a live holder whose name we need to read if the lock is refused.
        # O_NOFOLLOW: a lock that is a symlink must not get its target overwritten with our name.
        path = self.folder / LOCK_NAME
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            raise self._not_a_lock("a symbolic link" if error.errno == errno.ELOOP else "a directory") from None
        self._take(descriptor)
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        arguments = " ".join(sys.argv[1:])[:200]
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}, arguments: {arguments}"
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (holder + "\n").encode(), 0)
        self._descriptor = descriptor
        return self

    def check_free(self) -> None:
        """Refuses, as entering would, when another process holds the lock or the lock is not a plain file; takes
        nothing, writes nothing."""
        path = self.folder / LOCK_NAME
        if path.is_symlink() or path.is_dir():
            raise self._not_a_lock("a symbolic link" if path.is_symlink() else "a directory")
        try:
            descriptor = os.open(self.folder / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file (or an unreadable one, or a symlink): nobody to name; entering decides
        self._take(descriptor)
        os.close(descriptor)  # also drops the lock just taken

    def _not_a_lock(self, what: str) -> ConfigError:
        return ConfigError(
            self.key,
            f"{self.folder / LOCK_NAME} is {what}, not Spectra's lock file; Spectra leaves it as it is: remove it, "
            f"or choose another {self.key}",
        )

    def _take(self, descriptor: int) -> None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = (self.folder / LOCK_NAME).read_text().strip() or "a process that has not yet written its name"
            raise ConfigError(
                self.key,
                f"{self.folder} is in use by another Spectra process ({holder}); wait until it ends, "
                f"or choose another {self.key}",
            ) from None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._descriptor is not None:
            # The file stays (deleting it would let a third process lock a fresh inode while a second holds the
            # old one); only the lock is given up.
            os.close(self._descriptor)
            self._descriptor = None
