"""Writing result files: never half-written (temporary name, then one rename), readable as the umask allows.

`tempfile.mkstemp` creates files with mode 0600 whatever the umask says; a result written through it would be
private to its writer even on a group-shared results folder, while files written with `open()` follow the
umask. Everything semimed writes goes through here so that all its files follow the umask alike.

Every command checks where its output goes before it starts (`check_output_dir`, `check_output_file`):
a file where a folder is wanted, or a folder it cannot write, is one line naming the path, not an OSError
at the end.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from semimed.errors import SemimedError


def current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back (a process-wide value, read once per write).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, with the mode a plain `open(path, "w")` would give (0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for text (UTF-8)."""
    return atomic_write_bytes(path, text.encode())


def staging_path(path: str | Path) -> Path:
    """A hidden temporary name beside `path` for writers that need a file name (savefig, to_parquet,
    safetensors); finish with `publish(staging, path)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def publish(staging: str | Path, path: str | Path) -> Path:
    """Give a finished staging file the umask's mode and rename it to `path` (atomic on one filesystem)."""
    os.chmod(staging, 0o666 & ~current_umask())
    os.replace(staging, path)
    return Path(path)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (the writer named in a lock file; a lock left by a dead
    process is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists (a link counts, even a dangling one)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(path: str | Path, key: str) -> Path:
    """`path` (expanded) if a command can make it and write into it; else one SemimedError naming `key` and the
    path: a FILE where a folder is wanted (the path itself or a part above it), or a folder this process cannot
    write (read-only mount, another user's). Checked before the command computes anything, so that an hour of
    work does not end in a raw OSError when its output is written."""
    path = Path(path).expanduser()
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise SemimedError(f"{key} {path}: {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing}, where it would be made)"
        raise SemimedError(f"{key} {path}: folder not writable{where}")
    return path


def check_output_file(path: str | Path, key: str) -> Path:
    """`path` (expanded) if a command can write that FILE (replacing it); else one SemimedError naming `key` and
    the path: a folder where a file is wanted, or a parent that is a file or not writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SemimedError(f"{key} {path}: is a folder; give a file name (e.g. {path / 'out'}…)")
    parent = path.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise SemimedError(f"{key} {path}: cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SemimedError(f"{key} {path}: cannot be written: folder {existing} is not writable")
    return path
