"""`semimed` entry point: parse, dispatch, nothing else. Bad input exits 2 with one line on stderr.

The commands live by theme: data.py (split, prepare), runs.py (train, config, explain, predict, evaluate, backbones),
studies.py (sweep, submit, jobs, report, demo); common.py holds what more than one theme uses. Each command
imports what it runs inside its function, so that the CLI starts fast.
"""

from __future__ import annotations

import argparse
import sys

from semimed.cli import data, runs, studies
from semimed.errors import SemimedError, warnings_in_one_line

__all__ = ["build_parser", "main"]

# The order of `semimed --help`.
_COMMANDS = (
    data.add_split,
    data.add_prepare,
    runs.add_train,
    studies.add_sweep,
    studies.add_submit,
    studies.add_jobs,
    studies.add_report,
    studies.add_demo,
    runs.add_backbones,
    runs.add_explain,
    runs.add_predict,
    runs.add_evaluate,
    runs.add_config,
)


def build_parser() -> argparse.ArgumentParser:
    from semimed import __version__

    parser = argparse.ArgumentParser(
        prog="semimed",
        description="Few-label learning lab for medical images: patient-disjoint splits, nested label fractions, "
        "a matched supervised control, semi-supervised methods, Ray Train/Tune sweeps, reports with paired "
        "confidence intervals.",
        epilog="First steps: `semimed demo` (real BreastMNIST images, ~2 min on 2 idle cores), then "
        "`semimed config --defaults`, `semimed train configs/breastmnist_fixmatch.yaml --local`. "
        "`semimed COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"semimed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add_command in _COMMANDS:
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may follow the flags (`semimed train c.yaml --local train.steps=5`), which argparse's
    # positional `nargs="*"` does not take once an option came between.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        with warnings_in_one_line():
            args.func(args)
    except SemimedError as exc:
        print(f"semimed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line, no traceback; a command may say how to resume (the exception's message). On a
        # terminal the line starts on a new line (the terminal echoed `^C`).
        newline = "\n" if getattr(sys.stderr, "isatty", lambda: False)() else ""
        detail = f"; {exc}" if str(exc) else ""
        print(f"{newline}semimed: interrupted{detail}", file=sys.stderr, flush=True)
        return INTERRUPTED
    return 0


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C: 128 + SIGINT, as a shell reports it
