"""Writing result files: never half-written (temporary name, then one rename), readable as the umask allows.

`tempfile.mkstemp` creates files with mode 0600 whatever the umask says; a result written through it would be
private to its writer even on a group-shared results folder, while files written with `open()` follow the
umask. Everything semimed writes goes through here so that all its files follow the umask alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
