"""Lock files that work on shared storage: who holds them, whether that holder is still alive.

A lock file holds one line, "<host> pid <pid>". Whether its holder is alive is told two ways: on this host by
its pid; from another host (a shared filesystem between nodes, where the pid means nothing) by the file's mtime,
which a live holder refreshes every HEARTBEAT_S from a background thread (`Heartbeat`). A lock from another
host that nobody refreshed for STALE_AFTER_S was left by a dead process (a killed job, a lost node) and may be
taken over. Used by the run folder's lock (semimed/runs.py) and the decode cache's (semimed/data/cache/lock.py).

The stale timeout assumes that the hosts' clocks agree with the file server's to well within it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from semimed.files import process_alive

HEARTBEAT_S = 10.0  # a lock holder refreshes its lock file this often ...
STALE_AFTER_S = 60.0  # ... so a lock from another host untouched this long is left by a dead process


def holder_line() -> str:
    """What this process writes into a lock file it takes."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def read_holder(path: Path) -> str:
    """The lock file's "<host> pid <pid>" ("unknown" when empty or unreadable)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def lock_age(path: Path) -> float | None:
    """Seconds since the lock file was last written or refreshed; None when it is gone."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None


def describe_holder(path: Path) -> str:
    """`otherhost pid 123, refreshed 75 s ago`: the holder and the age of its last sign of life."""
    age = lock_age(path)
    return read_holder(path) + ("" if age is None else f", refreshed {age:.0f} s ago")


def stale_reason(path: Path, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the lock at `path` was left by a dead holder, or None while its holder may be alive (or the file is
    gone: then there is nothing to take over)."""
    age = lock_age(path)
    if age is None:
        return None
    host, _, pid = read_holder(path).partition(" pid ")
    if host == socket.gethostname() and pid.isdigit():
        return None if process_alive(int(pid)) else f"process {pid} is no longer running on this host"
    if age > stale_after_s:
        return f"not refreshed for {age:.0f} s, stale after {stale_after_s:g} s"
    return None


class Heartbeat:
    """Refreshes `path`'s mtime every `interval_s` from a daemon thread, for as long as the file names this
    process: once it is released, or taken over by another process, the thread stops instead of keeping that
    other holder's lock looking alive."""

    def __init__(self, path: Path, interval_s: float = HEARTBEAT_S) -> None:
        self.path, self.interval_s = Path(path), interval_s
        self._mine = holder_line()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"semimed-lock-{self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.path.read_text().strip() != self._mine:
                    return  # taken over (or released and taken by another process)
            except FileNotFoundError:
                return  # released
            except OSError:
                pass  # unreadable for a moment: refresh anyway, a live holder must not look dead
            # A failed refresh (a network filesystem's hiccup) is retried at the next beat: giving up would let
            # the lock of a live holder look stale to other hosts after STALE_AFTER_S.
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
