"""Ctrl-C under Ray: knowing that the user interrupted a run whose library took the signal.

Ray Tune (`Tuner.fit`) and Ray Train V2 (`TorchTrainer.fit`) install their own SIGINT handlers for a graceful
stop and do not chain to the previous one: Tune stops its trials, saves the experiment state and returns the
partial results as if the sweep had ended; Train aborts the run and calls `sys.exit(0)` from its handler. The
command must still end as an interrupted one (one line, exit 130: semimed.cli.main). `SigintWatch` sees the
signal whichever Python handler runs: the interpreter writes the number of every signal it receives to the
wakeup file descriptor (`signal.set_wakeup_fd`) before any handler is called.
"""

from __future__ import annotations

import signal
import socket
from types import TracebackType


class SigintWatch:
    """`with SigintWatch() as watch: ...; watch.seen()`: whether SIGINT arrived in the block.

    Also restores the SIGINT handler on exit: Tune leaves its handler installed after `fit` returns, and a
    later Ctrl-C would then only set an event nobody reads. Outside the main thread (where Python delivers
    no signals) it watches nothing and `seen()` is False."""

    def __init__(self) -> None:
        self._received = False
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._previous_fd = -1
        self._previous_handler: object = None

    def __enter__(self) -> SigintWatch:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        try:
            self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            reader.close()
            writer.close()
            return self
        self._reader, self._writer = reader, writer
        self._previous_handler = signal.getsignal(signal.SIGINT)
        return self

    def seen(self) -> bool:
        """Whether SIGINT arrived since the block started (so far)."""
        if self._reader is not None:
            while True:
                try:
                    data = self._reader.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                self._received = self._received or signal.SIGINT in data
        return self._received

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._reader is None or self._writer is None:
            return
        self.seen()
        signal.set_wakeup_fd(self._previous_fd)
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)  # type: ignore[arg-type]
        self._reader.close()
        self._writer.close()
        self._reader = self._writer = None
