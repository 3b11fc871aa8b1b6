"""One file-system layer for what lives under ``--storage-path``: a local folder, an NFS mount or
an object store (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``), through ``pyarrow.fs``, the layer
Ray Train itself writes its checkpoints with. Credentials and endpoints come from the standard
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for
S3-compatible stores such as MinIO, ``GOOGLE_APPLICATION_CREDENTIALS``, ...); nothing here logs
them.

Workers and drivers pass each other *references* (a path or a URI), never copies on one node's
disk. A process that needs the bytes of a remote checkpoint or knowledge bank calls
``localize``: it downloads the folder once per node into a cache (atomically, so a download cut
short is never used) and returns the local copy; the cache is keyed by what is in the store, so
a changed folder is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# URI schemes pyarrow.fs resolves; MLflow's models:/ and runs:/ are not storage.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


def is_remote(ref: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://bucket/key``), False for a local path (``file://``
    included: it is a local folder)."""
    text = os.fspath(ref)
    return "://" in text and text.split("://", 1)[0].lower() in OBJECT_STORE_SCHEMES


def absolute(ref: str | os.PathLike) -> str:
    """``ref`` as every node reads it: an object-store URI unchanged, a local path (or a
    ``file://`` URI) as an absolute path."""
    text = os.fspath(ref)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return text if "://" in text else str(Path(text).expanduser().resolve())


def join(storage: str | os.PathLike, *parts: str) -> str:
    """``storage`` with ``parts`` appended; a URI's query (``?endpoint_override=...``) stays last."""
    storage = os.fspath(storage)
    if "://" in storage:
        base, query = (storage.split("?", 1) + [""])[:2]
        joined = "/".join([base.rstrip("/"), *parts])
        return f"{joined}?{query}" if query else joined
    return str(Path(storage, *parts))


def uri_of(storage: str, path: str) -> str:
    """The URI, in the form of ``storage``, of ``path`` as pyarrow names it inside the filesystem
    of ``storage`` (e.g. Ray Train's ``Checkpoint.path``); keeps the host part of ``hdfs://``
    and the query of ``storage``."""
    if not is_remote(storage):
        return str(Path(path))
    _, root = filesystem(storage)
    root, path = root.rstrip("/"), path.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        raise ValueError(f"{path} is not inside {storage}")
    return join(storage, *filter(None, path[len(root):].split("/")))


def filesystem(uri: str | os.PathLike):
    """``(pyarrow filesystem, path within it)`` of a local path or an object-store URI."""
    from pyarrow import fs

    text = os.fspath(uri)
    if "://" not in text:
        return fs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    return fs.FileSystem.from_uri(text)


def exists(uri: str | os.PathLike) -> bool:
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    return filesystem_.get_file_info(path).type != fs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    return filesystem_.get_file_info(path).type == fs.FileType.Directory


def list_dir(uri: str | os.PathLike) -> list[str]:
    """Names of the entries directly under ``uri`` (sorted; empty when it is no folder)."""
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    if filesystem_.get_file_info(path).type != fs.FileType.Directory:
        return []
    return sorted(info.base_name for info in filesystem_.get_file_info(fs.FileSelector(path)))


def read_bytes(uri: str | os.PathLike) -> bytes | None:
    """The file at ``uri``, or None when there is none."""
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    if filesystem_.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem_.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write atomically where the file system allows it (write aside, then move; an object store
    makes a single PUT visible only once complete)."""
    filesystem_, path = filesystem(uri)
    filesystem_.create_dir(path.rsplit("/", 1)[0], recursive=True)
    staging = f"{path}.tmp-{uuid.uuid4().hex[:12]}"  # unique across hosts, not only processes
    try:
        with filesystem_.open_output_stream(staging) as stream:
            stream.write(data)
        filesystem_.move(staging, path)
    except BaseException:
        try:  # a full disk must not keep a half-written file
            filesystem_.delete_file(staging)
        except Exception:  # noqa: BLE001 - the original error is the one to raise
            pass
        raise


def remove(uri: str | os.PathLike) -> None:
    """Delete a file or a folder (recursively) if it exists; never raises."""
    from pyarrow import fs

    try:
        filesystem_, path = filesystem(uri)
        info = filesystem_.get_file_info(path)
        if info.type == fs.FileType.Directory:
            filesystem_.delete_dir(path)
        elif info.type == fs.FileType.File:
            filesystem_.delete_file(path)
    except Exception as error:  # noqa: BLE001 - cleanup is best effort
        log.warning("could not remove %s (%s)", os.fspath(uri), error)


def read_json(uri: str | os.PathLike) -> dict[str, Any] | None:
    data = read_bytes(uri)
    return None if data is None else json.loads(data.decode())


def write_json(uri: str | os.PathLike, data: dict[str, Any]) -> None:
    write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode())


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (a no-op when it is the same folder)."""
    from pyarrow import fs

    filesystem_, path = filesystem(uri)
    if "://" not in uri and Path(path) == Path(local).resolve():
        return
    filesystem_.create_dir(path, recursive=True)
    fs.copy_files(str(local), path, destination_filesystem=filesystem_)


def cache_dir() -> Path:
    """Where this node keeps downloaded checkpoints and banks: ``DKD_CACHE_DIR``, else
    ``~/.cache/dkd-ray/storage``."""
    return Path(os.environ.get("DKD_CACHE_DIR") or Path.home() / ".cache" / "dkd-ray" / "storage")


CACHE_MAX_BYTES = 20 << 30  # DKD_CACHE_MAX_BYTES: what the node cache may hold before old copies go
CACHE_KEEP_S = 3600.0  # DKD_CACHE_KEEP_S: a copy used within this long is never evicted (a job may read it)


def prune_cache(root: Path | None = None, max_bytes: int | None = None, keep_s: float | None = None,
                keep: Path | None = None) -> list[Path]:
    """Bound the node cache: remove the least recently used copies (a copy's mtime is its last
    use) until it holds at most ``max_bytes``, never ``keep`` nor one used within ``keep_s``
    seconds; and remove staging folders of downloads that died (older than ``keep_s``). Returns
    what was removed. Never raises: a cache that cannot be pruned is only bigger."""
    root = root or cache_dir()
    limit = int(os.environ.get("DKD_CACHE_MAX_BYTES", CACHE_MAX_BYTES)) if max_bytes is None else max_bytes
    keep_s = float(os.environ.get("DKD_CACHE_KEEP_S", CACHE_KEEP_S)) if keep_s is None else keep_s
    now, removed, entries = time.time(), [], []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        try:
            used = child.stat().st_mtime
            if child.name.startswith("."):  # a staging folder or a lock file
                if child.is_dir() and now - used > keep_s:
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
                continue
            size = sum(f.stat().st_size for f in child.rglob("*") if f.is_file()) if child.is_dir() else \
                child.stat().st_size
            entries.append((used, child, size))
        except OSError:
            continue
    total = sum(size for _, _, size in entries)
    for used, child, size in sorted(entries, key=lambda e: e[0]):  # least recently used first
        if total <= limit:
            break
        if child == keep or now - used <= keep_s:
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
        total -= size
        log.info("node cache %s over %d bytes: removed %s (last used %.0f s ago)", root, limit, child.name, now - used)
    return removed


def localize(ref: str | os.PathLike) -> Path:
    """A local path holding ``ref``: the path itself when local, else this node's cached copy of
    the remote file or folder (downloaded on first use). Raises ``FileNotFoundError`` naming the
    URI when nothing is there."""
    from pyarrow import fs

    text = os.fspath(ref)
    if not is_remote(text):
        return Path(text).expanduser()
    filesystem_, path = filesystem(text)
    kind = filesystem_.get_file_info(path).type
    if kind == fs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {text}")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    files = ([info for info in filesystem_.get_file_info(fs.FileSelector(path, recursive=True))
              if info.type == fs.FileType.File] if kind == fs.FileType.Directory else [filesystem_.get_file_info(path)])
    # The key: the endpoint (one bucket name on two S3-compatible servers is two things), the URI
    # and what is there now (names, sizes, times): a changed or re-created folder, or one that
    # was still being written at the last download, is fetched again, never served stale.
    listing = sorted((i.path, i.size, i.mtime_ns) for i in files)
    key = json.dumps([os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", ""),
                      text.rstrip("/"), listing], default=str)
    target = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}-{name}"
    if target.exists():
        _touch(target)  # its last use: what eviction goes by
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait for this download, not repeat it
        if target.exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            log.info("downloading %s to %s", text, target)
            if kind == fs.FileType.Directory:
                (staging / name).mkdir()
                # One streamed GET per file: copy_files' ranged 1 MiB reads are several times slower.
                for info in files:
                    _download(filesystem_, info.path, staging / name / info.path[len(path):].lstrip("/"))
            else:
                _download(filesystem_, path, staging / name)
            os.rename(staging / name, target)  # atomic: a copy cut short is never found
            _touch(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    prune_cache(target.parent, keep=target)
    return target


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _download(filesystem_, path: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with filesystem_.open_input_stream(path) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, length=8 << 20)
