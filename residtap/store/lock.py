"""An exclusive lock on a store folder while a capture writes it.

    with folder_lock(folder):        # StoreLockedError if another capture holds it
        ...write shards...

The lock is `fcntl.flock` on `.residtap.lock` inside the folder, which also records who holds
it (pid, host, start time) so that a refusal can say so. The kernel releases a flock when its
process dies, so a SIGKILLed capture leaves no stale lock: the next run takes it and resumes.
flock conflicts between two open files even within one process, so two threads capturing into
one folder are refused too. The file is removed on release; a waiter that locked the removed
file notices (the path no longer names its file) and tries again. Where the file system has no
flock (some network file systems) the capture runs unlocked, with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".residtap.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]


class StoreLockedError(ValueError):
    """Another capture (process or thread) is writing this store folder."""


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the body (the folder must exist)."""
    path = folder / LOCK_FILE
    if fcntl is None:
        log.warning("no fcntl.flock on this platform; %s is not locked against other captures",
                    folder)
        yield
        return
    fd = _acquire(path, folder)
    if fd is None:
        yield
        return
    try:
        yield
    finally:
        try:
            os.unlink(path)  # before unlocking: a waiter then sees the path changed and retries
        except OSError:
            pass
        os.close(fd)  # releases the flock


def _acquire(path: Path, folder: Path) -> int | None:
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreLockedError(
                    f"the store folder {str(folder)!r} is being written by another capture "
                    f"({holder}); wait for it to finish or stop it, or write to another folder"
                ) from None
            log.warning("cannot lock %s (%s); the capture runs without a lock", folder, err)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: again
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return fd
    raise RuntimeError(f"could not lock {path}: the file kept being replaced")


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"
