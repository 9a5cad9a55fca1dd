"""The lock file `.<cache folder name>.lock` beside a cache folder: who is building or refreshing it.

Two processes that need the same cache at once (parallel Ray trials) take turns through the lock file: the
second waits and then reads. The file holds "<host> pid <pid>"; one left by a killed process on this host is
cleared.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from semimed.data.cache.layout import DecodedPixels
from semimed.errors import SemimedError
from semimed.files import process_alive

_WAIT_POLL_S = 1.0


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _lock_holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _try_lock(lock: Path) -> bool:
    """Create the lock file (atomically, O_EXCL); clear it first if it names a dead process on this host."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = _lock_holder(lock).partition(" pid ")
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a killed build: the .partial it left is resumable
                continue
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        return True
    return False


def take_lock(
    folder: Path, wait: bool, ready: Callable[[], DecodedPixels | None] | None = None
) -> DecodedPixels | None:
    """Take `folder`'s lock file and return None; or, while waiting for another holder, return `ready()` as
    soon as it is not None (the cache that holder was building), without the lock. wait=False: raise
    instead."""
    lock = lock_path(folder)
    announced = False
    while not _try_lock(lock):
        if not wait:
            raise SemimedError(
                f"{folder}: another process ({_lock_holder(lock)}) is building this cache; wait "
                f"for it, or delete {lock} if that process is gone"
            )
        if not announced:
            print(f"waiting for {_lock_holder(lock)} to finish writing {folder}", file=sys.stderr)
            announced = True
        time.sleep(_WAIT_POLL_S)
        if ready is not None:
            found = ready()
            if found is not None:
                return found
    return None
