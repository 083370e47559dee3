"""A Ray Data datasource for dinor1 WebDataset shards that never lets one bad sample stop a read.

Ray's own ``read_webdataset`` raises (and so fails the whole dataset) on a truncated tar, on a
key whose members are not adjacent, or on duplicate members, and its default decoder would
unpickle ``.pt``/``.pkl`` members if allowed. This datasource streams each tar itself and turns
every such problem into a row with a non-empty ``error`` column naming the shard and key; the
decode step and the collate function skip and count those rows.

Rows (one per sample)::

    __key__  str    sample key (no dots)
    __url__  str    the shard it came from
    image    bytes  original image bytes (or null)
    ext      str    image member extension ("jpg" | "png" | "")
    json     bytes  annotation JSON bytes (or null)
    error    str    "" for a readable sample, else why it is skipped
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from data_pipelines.shard_format import IMAGE_EXTENSIONS, REFUSED_EXTENSIONS

_CHUNK_ROWS = 64
_IMAGE_EXT_ALIASES = {"jpeg": "jpg"}


def _empty_row(key: str, url: str) -> dict:
    return {"__key__": key, "__url__": url, "image": None, "ext": "", "json": None, "error": ""}


def _finish(row: dict) -> dict:
    if not row["error"]:
        if row["image"] is None:
            row["error"] = f"sample {row['__key__']!r} in {row['__url__']}: no image member"
        elif row["json"] is None:
            row["error"] = f"sample {row['__key__']!r} in {row['__url__']}: no .json member"
    return row


def iter_shard_rows(fileobj, url: str) -> Iterator[dict]:
    """Yield one row per sample of a tar stream; problems become rows with ``error`` set."""
    current: dict | None = None
    seen: set[str] = set()
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|")
        for member in stream:
            if not member.isreg():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            ext = _IMAGE_EXT_ALIASES.get(ext.lower(), ext.lower())
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield _finish(current)
                if key in seen:
                    current = _empty_row(key, url)
                    current["error"] = f"sample {key!r} in {url}: members not adjacent in the tar"
                else:
                    current = _empty_row(key, url)
                seen.add(key)
            data = stream.extractfile(member).read()
            if ext in REFUSED_EXTENSIONS:
                current["error"] = (
                    f"sample {key!r} in {url}: refusing .{ext} member (shards are never "
                    "unpickled; store images and JSON only)"
                )
            elif ext in IMAGE_EXTENSIONS:
                if current["image"] is not None:
                    current["error"] = f"sample {key!r} in {url}: two image members"
                current["image"], current["ext"] = data, ext
            elif ext == "json":
                current["json"] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        if current is not None:
            current["error"] = current["error"] or f"sample {current['__key__']!r} in {url}: {exc}"
            yield current
            current = None
        yield {**_empty_row("", url), "error": f"shard {url} is truncated or corrupt: {exc}"}
    if current is not None:
        yield _finish(current)


class ShardDatasource(FileBasedDatasource):
    """Reads ``shard-*.tar`` files (local paths or ``s3://``/``gs://`` URIs via pyarrow)."""

    _FILE_EXTENSIONS = ["tar"]

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = []
        for row in iter_shard_rows(f, path):
            rows.append(row)
            if len(rows) >= _CHUNK_ROWS:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


ROW_SCHEMA = pa.schema(
    [
        ("__key__", pa.string()),
        ("__url__", pa.string()),
        ("image", pa.binary()),
        ("ext", pa.string()),
        ("json", pa.binary()),
        ("error", pa.string()),
    ]
)
