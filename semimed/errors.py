"""The one exception type users see: a one-line message naming the file, row or key at fault; semimed's own
warning type, and how a command says those warnings (once each, one line)."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator


class SemimedError(ValueError):
    """Bad input: the message names the file, row or key, and says what was expected."""


class UnknownNameError(SemimedError, KeyError):
    """An unknown registry name (method, backbone, …); the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SemimedWarning(RuntimeWarning):
    """A result that is degraded or undefined but not wrong (a metric is NaN, a trial is skipped), in semimed's
    own words. The CLI says each one once, as one line `semimed: warning: ...`, and filters other libraries'
    warnings. A RuntimeWarning, so that library callers' `pytest.warns(RuntimeWarning)` and filters still apply."""


@contextlib.contextmanager
def warnings_in_one_line() -> Iterator[None]:
    """For the duration of a command: semimed's own warnings (SemimedWarning: a NaN metric, a skipped trial)
    print once each as one line `semimed: warning: MESSAGE` on stderr; other libraries' warnings (torch,
    numpy, Ray deprecations) are filtered. Set here, at the CLI boundary, so that the library keeps warning
    as usual for Python callers and tests."""
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = " ".join(str(message).split()) or category.__name__
        if text not in said:
            said.add(text)
            # Not print(): Ray Train workers patch it to write each line twice (to stderr and to a logger).
            sys.stderr.write(f"semimed: warning: {text}\n")
            sys.stderr.flush()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", SemimedWarning)  # `said` keeps it to once per message
        warnings.showwarning = show
        yield
