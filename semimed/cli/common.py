"""Helpers that more than one theme of commands uses: a positive-integer argument type and data.root checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from semimed.errors import SemimedError


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def require_root(cfg, where: str) -> None:
    """data.root must be given: search spaces and example configs carry no machine paths."""
    if cfg.data.root:
        return
    from semimed.data import dataset_spec

    spec = dataset_spec(cfg.data.dataset)
    raise SemimedError(
        f"{where}: data.root is not set; give it on the command line, data.root=PATH "
        f"({spec.name}: {spec.root_help})"
    )


def resolved_root(root: str, where: str) -> str:
    """A relative data.root made absolute (against the current directory), so that it means the same file in
    Ray's trial and worker processes, which run in other directories; one that does not exist is an error."""
    path = Path(root).expanduser()
    if "://" in root or path.is_absolute():
        return str(path) if "://" not in root else root
    if not path.exists():
        raise SemimedError(
            f"{where}: data.root {root}: not found from {Path.cwd()} (relative paths in configs/ and "
            "search_spaces/ are relative to the repository root: run from there, or give data.root=/absolute/path)"
        )
    return str(path.resolve())
