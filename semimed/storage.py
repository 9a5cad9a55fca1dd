"""Where results live: a filesystem path (local disk, or NFS seen by every node) or any URI that `pyarrow.fs`
understands (`s3://`, `gs://`, `hdfs://`, ...), the same locations Ray Tune/Train take as `storage_path`.

A filesystem path is written in place. A URI cannot be (no rename, no append, no lock files), so a run folder
that belongs there is *staged* (`staged_folder`): the run writes an ordinary local folder on its node (under the
node's temp dir), and that folder is mirrored to the URI with `pyarrow.fs.copy_files` at each checkpoint and at
the end. A run that is retried (on any node) first pulls the folder back, so `run.json` is there to check the
run's identity (semimed/runs.py) and its curves continue. Checkpoints are not mirrored: Ray persists each
reported checkpoint to the same storage itself and hands it back on a retry (`get_checkpoint()`).

S3-compatible servers (MinIO, Ceph, a test's moto): set `AWS_ENDPOINT_URL` (and credentials) on every node, as
pyarrow reads them, or put the options in the URI: `s3://bucket/prefix?endpoint_override=host:9000&scheme=http`.
`join` keeps such a query at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from semimed.errors import SemimedError
from semimed.files import atomic_write_bytes, process_alive

# What a mirror never uploads: hidden names (the run lock, half-written staging files) and checkpoints, which
# Ray persists itself (see the module docstring).
NOT_MIRRORED = ("checkpoints",)
STAGING_ROOT = "semimed-staging"


def is_uri(location: str | Path) -> bool:
    """Whether `location` is a URI for pyarrow.fs (`s3://…`); `file://` and plain paths are filesystem paths."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | Path) -> str:
    """A URI as given (without a trailing slash); a filesystem path made absolute (`~` expanded)."""
    text = str(location)
    if is_uri(text):
        path, sep, query = text.partition("?")
        return path.rstrip("/") + sep + query
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...`, for paths and URIs alike (a URI's `?query` stays at the end)."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text, *parts))
    path, sep, query = text.partition("?")
    return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def name_of(location: str | Path) -> str:
    """The last part of a path or URI (`s3://b/x/exp?…` -> `exp`)."""
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str | Path):
    """(pyarrow filesystem, path on it) for a path or URI; an unusable URI is one line naming it."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... with multi-line texts
        raise SemimedError(
            f"{location}: not a storage location pyarrow can open ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _kind(fs, path: str):
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(path).type
    except OSError as exc:
        raise SemimedError(f"{path}: storage not reachable ({_first_line(exc)})") from None
    except Exception:  # noqa: BLE001 - an invalid path on that filesystem reads as "not there"
        return pafs.FileType.NotFound


def check_location(location: str | Path, key: str) -> str:
    """`location` if a command can write its results there, checked before it starts; else one line naming
    `key` and the location. A path: a folder (or one that can be made) this process may write. An `s3://` URI:
    its endpoint must accept a connection within PROBE_TIMEOUT_S (pyarrow retries an unreachable server for
    tens of seconds and then raises a multi-line OSError), then the location must not be an object (a file)."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        from semimed.files import check_output_dir

        check_output_dir(normalize(location), key)
        return str(location)
    if str(location).startswith("s3://"):
        scheme, host, port = s3_endpoint(str(location))
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise SemimedError(
                f"{key} {location}: storage not reachable: no connection to its endpoint {scheme}://{host}:{port} "
                f"({exc.strerror or type(exc).__name__}); start the server, or set the endpoint (AWS_ENDPOINT_URL, "
                "or ?endpoint_override=HOST:PORT&scheme=http in the URI)"
            ) from None
    fs, path = filesystem(location)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise SemimedError(f"{key} {location}: storage not reachable ({_first_line(exc)})") from None
    if kind == pafs.FileType.File:
        raise SemimedError(f"{key} {location}: is a file, not a folder")
    return str(location)


PROBE_TIMEOUT_S = 5.0  # connecting to a live endpoint takes milliseconds; a dead one is reported after this


def s3_endpoint(uri: str) -> tuple[str, str, int]:
    """(scheme, host, port) that pyarrow connects to for an `s3://` URI: its `endpoint_override` (and
    `scheme`), else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS's regional endpoint."""
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(uri).query)
    scheme = (query.get("scheme") or ["https"])[0]
    endpoint = (query.get("endpoint_override") or [""])[0]
    if not endpoint:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not endpoint:
        region = (
            (query.get("region") or [""])[0]
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION", "")
        )
        return "https", f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com", 443
    if "://" in endpoint:
        scheme, _, endpoint = endpoint.partition("://")
    hostport = endpoint.split("/", 1)[0]
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        host, port = hostport, ""
    return scheme, host.strip("[]"), int(port) if port else (443 if scheme == "https" else 80)


def is_dir(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return _kind(fs, path) == pafs.FileType.Directory


def is_file(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return _kind(fs, path) == pafs.FileType.File


def list_files(location: str | Path) -> dict[str, int]:
    """Every file below `location`: relative POSIX path -> size ({} when there is nothing)."""
    import pyarrow.fs as pafs

    fs, base = filesystem(location)
    if _kind(fs, base) != pafs.FileType.Directory:
        return {}
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {
        info.path[len(base) :].lstrip("/"): info.size for info in found if info.type == pafs.FileType.File
    }


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write a whole file: atomically on a filesystem, as one object on object storage (also atomic)."""
    if not is_uri(location):
        return str(atomic_write_bytes(normalize(location), data))
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
    return str(location)


def copy_file(source: str | Path, destination: str | Path) -> None:
    """One file between any two locations (pyarrow.fs.copy_files)."""
    import pyarrow.fs as pafs

    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(destination)
    if not is_uri(destination):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def download(location: str | Path, local_dir: Path, names: Iterable[str] | None = None) -> list[str]:
    """Copy the files below `location` (only the relative paths in `names`, when given) into `local_dir`;
    returns the relative paths copied."""
    present = list_files(location)
    wanted = [n for n in present if names is None or n in set(names)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores answer many small GETs in parallel
        list(pool.map(lambda rel: copy_file(join(location, rel), local_dir / rel), wanted))
    return wanted


class Mirror:
    """A local folder mirrored to a storage URI: `pull` copies what the URI holds into it, `push` uploads the
    files added or changed since the last pull/push (hidden names and NOT_MIRRORED subfolders never)."""

    def __init__(self, local: Path, location: str) -> None:
        self.local = Path(local)
        self.location = location
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when last in sync

    def _mirrored(self, rel: str) -> bool:
        parts = rel.split("/")
        return not any(p.startswith(".") for p in parts) and parts[0] not in NOT_MIRRORED

    def pull(self) -> list[str]:
        pulled = download(
            self.location, self.local, [n for n in list_files(self.location) if self._mirrored(n)]
        )
        for rel in pulled:
            stat = (self.local / rel).stat()
            self._sent[rel] = (stat.st_size, stat.st_mtime_ns)
        return pulled

    def push(self) -> list[str]:
        changed = []
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            if not self._mirrored(rel):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # replaced between the listing and now: the next push takes it
                continue
            if self._sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                changed.append((rel, (stat.st_size, stat.st_mtime_ns)))
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(
                pool.map(lambda item: copy_file(self.local / item[0], join(self.location, item[0])), changed)
            )
        self._sent.update(changed)
        return [rel for rel, _ in changed]


class Folder:
    """A run folder as the code that writes it sees it: `path` is a local folder; `sync()` makes storage
    current (a no-op when `path` is the storage itself)."""

    def __init__(self, path: Path, mirror: Mirror | None = None) -> None:
        self.path = path
        self.mirror = mirror

    def sync(self) -> None:
        if self.mirror is not None:
            self.mirror.push()


@contextlib.contextmanager
def staged_folder(location: str | Path, pull: bool = True) -> Iterator[Folder]:
    """The folder at `location` to write into: the folder itself for a filesystem path; for a URI, a local
    staging folder that first receives what the URI holds (`pull`) and is pushed back on `sync()` and on exit
    (also after an error: the curves up to it are kept), then removed."""
    if not is_uri(location):
        path = Path(normalize(location))
        yield Folder(path)
        return
    staging = _new_staging(name_of(location))
    mirror = Mirror(staging, normalize(location))
    try:
        if pull:
            mirror.pull()
        yield Folder(staging, mirror)
        mirror.push()
    except SemimedError as exc:  # e.g. "<folder> holds another run": name the storage location, not staging
        with contextlib.suppress(Exception):
            mirror.push()
        raise type(exc)(str(exc).replace(str(staging), mirror.location)) from None
    except BaseException:
        with contextlib.suppress(Exception):  # never hide the error that ended the run
            mirror.push()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _new_staging(name: str) -> Path:
    """`<tmp>/semimed-staging/<name>.<host>.<pid>`: one per process. Staging folders of dead processes on this
    host (a SIGKILLed trial never cleans up) are removed first: what they held was pushed or is lost anyway."""
    root = Path(tempfile.gettempdir()) / STAGING_ROOT
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in root.iterdir():
        owner, _, pid = old.name.rpartition(".")
        if owner.endswith(f".{host}") and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = root / f"{name}.{host}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging
