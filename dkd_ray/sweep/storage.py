"""The sweep's small state files, on the same storage as its checkpoints (a local folder, NFS or
s3://), so that ``--resume`` works from any driver, including a new ``ray job submit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def join(storage: str, *parts: str) -> str:
    if "://" in storage:
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts))


def _filesystem(uri: str):
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(uri)


def read_bytes(uri: str) -> bytes | None:
    """The file at ``uri``, or None when there is none."""
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the file system allows it (write aside, then move)."""
    filesystem, path = _filesystem(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    staging = f"{path}.tmp"
    with filesystem.open_output_stream(staging) as stream:
        stream.write(data)
    filesystem.move(staging, path)


def read_json(uri: str) -> dict[str, Any] | None:
    data = read_bytes(uri)
    return None if data is None else json.loads(data.decode())


def write_json(uri: str, data: dict[str, Any]) -> None:
    write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode())


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (a no-op when it is the same folder)."""
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    if "://" not in uri and Path(path) == Path(local).resolve():
        return
    filesystem.create_dir(path, recursive=True)
    fs.copy_files(str(local), path, destination_filesystem=filesystem)
