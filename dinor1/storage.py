"""Run folders on a local/shared path or an object store (``s3://``, ``gs://``, ...).

``checkpointing.storage_path`` may be a folder or a URI that pyarrow understands; Ray Train
writes its checkpoints there through pyarrow, and this module does the rest the same way (the
MLflow run-id file, the resolved config, the exported final weights, finding the newest
checkpoint). Credentials come from the environment (instance roles, workload identity,
``AWS_*`` variables), never from this project's files; ``AWS_ENDPOINT_URL`` points S3 at a
compatible server.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def is_uri(location: str | os.PathLike) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for folders and URIs alike (a URI's ``?query`` stays at the end)."""
    text = str(location)
    base, sep, query = text.partition("?")
    for part in parts:
        base = base.rstrip("/") + "/" + part.strip("/")
    return base + sep + query


def _fs(location: str):
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location.removeprefix("file://")).expanduser())


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    fs, path = _fs(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str, text: str) -> None:
    fs, path = _fs(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def upload_dir(local: str | Path, location: str) -> None:
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(location: str, local: str | Path | None = None) -> Path:
    """A local copy of the folder at ``location`` (into a new temp dir by default)."""
    import pyarrow.fs as pafs

    target = Path(local or tempfile.mkdtemp(prefix="dinor1-download-"))
    fs, path = _fs(location)
    pafs.copy_files(path, str(target), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return target


def subfolders(location: str, pattern_prefix: str) -> list[tuple[str, float]]:
    """(name, mtime) of the direct subfolders of ``location`` whose name starts with the prefix."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    out = []
    for info in infos:
        if info.type == pafs.FileType.Directory and info.base_name.startswith(pattern_prefix):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out.append((info.base_name, mtime))
    return out


def local_copy(location: str) -> Path:
    """A local copy of an object-store folder, cached per node under ``~/.cache/dinor1`` (or
    ``$DINOR1_CACHE``) by URI, so every actor on a node downloads it once. Concurrent callers
    each download into a temp folder and the first rename wins."""
    import hashlib
    import shutil

    cache = Path(os.environ.get("DINOR1_CACHE", "~/.cache/dinor1")).expanduser()
    target = cache / hashlib.sha256(location.encode()).hexdigest()[:24]
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = download_dir(location, tempfile.mkdtemp(prefix="partial-", dir=cache))
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def files(location: str) -> list[tuple[str, int]]:
    """(name, size) of the files directly in the folder at ``location`` ([] if missing)."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return [(i.base_name, i.size) for i in fs.get_file_info(pafs.FileSelector(path))
            if i.type == pafs.FileType.File]
