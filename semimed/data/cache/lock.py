"""The lock file `.<cache folder name>.lock` beside a cache folder: who is building or refreshing it.

Two processes that need the same cache at once (parallel Ray trials) take turns through the lock file: the
second waits and then reads. The file holds "<host> pid <pid>", and its holder refreshes its mtime while it
builds (semimed/lockfile.py, shared with the run folder's lock). A lock left by a dead holder is reported and
taken over: on this host when its pid is gone, from another host (a cache on shared storage) when it was not
refreshed for `stale_after_s` (STALE_AFTER_S, 60 s). Release it with `release_lock`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from semimed.data.cache.layout import DecodedPixels
from semimed.errors import SemimedError
from semimed.lockfile import STALE_AFTER_S, Heartbeat, describe_holder, holder_line, read_holder, stale_reason

_WAIT_POLL_S = 1.0
_HEARTBEATS: dict[Path, Heartbeat] = {}  # the cache locks this process holds


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _try_lock(lock: Path) -> bool:
    """Create the lock file naming this process (atomically, O_EXCL); False if it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{holder_line()}\n")
    return True


def take_lock(
    folder: Path,
    wait: bool,
    ready: Callable[[], DecodedPixels | None] | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> DecodedPixels | None:
    """Take `folder`'s lock file and return None; or, while waiting for another holder, return `ready()` as
    soon as it is not None (the cache that holder was building), without the lock. wait=False: raise
    instead. A lock whose holder is dead (see the module's docstring) is taken over, saying whose it was."""
    lock = lock_path(folder)
    announced = False
    while not _try_lock(lock):
        reason = stale_reason(lock, stale_after_s)
        if reason is not None:
            # Its .partial, if any, is resumable: the build picks up the rows it had written.
            print(f"semimed: taking over {lock} from {describe_holder(lock)} ({reason})", file=sys.stderr)
            lock.unlink(missing_ok=True)
            continue
        if not lock.exists():  # released between the two looks: try again at once
            continue
        if not wait:
            raise SemimedError(
                f"{folder}: another process ({read_holder(lock)}) is building this cache; wait "
                f"for it, or delete {lock} if that process is gone"
            )
        if not announced:
            print(
                f"waiting for {describe_holder(lock)} to finish writing {folder} (a lock from another host not "
                f"refreshed for {stale_after_s:g} s is taken over)",
                file=sys.stderr,
            )
            announced = True
        time.sleep(_WAIT_POLL_S)
        if ready is not None:
            found = ready()
            if found is not None:
                return found
    previous = _HEARTBEATS.pop(lock, None)  # of an earlier hold whose file someone else removed
    if previous is not None:
        previous.stop()
    _HEARTBEATS[lock] = Heartbeat(lock)
    return None


def release_lock(folder: Path) -> None:
    """Stop refreshing `folder`'s lock file and remove it."""
    lock = lock_path(folder)
    heartbeat = _HEARTBEATS.pop(lock, None)
    if heartbeat is not None:
        heartbeat.stop()
    lock.unlink(missing_ok=True)
