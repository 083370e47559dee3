"""A Ray Data datasource for dinor1 WebDataset shards that never lets one bad sample stop a read.

Ray's own ``read_webdataset`` raises (and so fails the whole dataset) on a truncated tar, on a
key whose members are not adjacent, or on duplicate members, and its default decoder would
unpickle ``.pt``/``.pkl`` members if allowed. This datasource streams each tar itself and turns
every such problem into a row with a non-empty ``error`` column, ``"<kind>: <message>"`` naming
the shard and key (kinds: :data:`dinor1.data.quality.SKIP_KINDS`); the decode step and the
collate function skip and count those rows. A tar that breaks off (mid-member, mid-header, or
without its end-of-archive marker) keeps the complete samples before the break and adds one
``corrupt_shard`` row.

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
from ray.data.block import BlockAccessor
from ray.data.datasource import FileBasedDatasource

from dinor1.data.executor_limits import refresh_limits_sooner
from dinor1.data.quality import skip_error
from dinor1.data_pipelines.shard_format import IMAGE_EXTENSIONS, REFUSED_EXTENSIONS

# here, so that it also runs where a dataset of ours is unpickled to run (Ray Train's split
# coordinator): see dinor1.data.executor_limits
refresh_limits_sooner()

_CHUNK_ROWS = 64
_IMAGE_EXT_ALIASES = {"jpeg": "jpg"}


def _empty_row(key: str, url: str) -> dict:
    return {"__key__": key, "__url__": url, "image": None, "ext": "", "json": None, "error": ""}


def _fail(row: dict, kind: str, detail: str) -> None:
    """Mark ``row`` skipped, unless an earlier problem already did."""
    if not row["error"]:
        row["error"] = skip_error(kind, f"sample {row['__key__']!r} in {row['__url__']}: {detail}")


def _finish(row: dict) -> dict:
    if row["image"] is None:
        _fail(row, "missing_image", "no image member")
    elif row["json"] is None:
        _fail(row, "missing_json", "no .json member")
    return row


class _HeaderWatch(tarfile.TarInfo):
    """Remembers why a stream's last header read failed: ``tarfile`` ends iteration quietly on a
    truncated or invalid header, or when the data stops without the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.dinor1_end = exc
            raise


def _broken_end(stream: tarfile.TarFile) -> str | None:
    """Why a stream that iterated to its end is incomplete, or None for a proper end."""
    end = getattr(stream, "dinor1_end", None)
    if end is None or isinstance(end, tarfile.EOFHeaderError):  # a zero block: the end marker
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return "the data stops without the end-of-archive marker"
    return f"{end} at byte {stream.offset}"


def iter_shard_rows(fileobj, url: str) -> Iterator[dict]:
    """Yield one row per sample of a tar stream; problems become rows with ``error`` set."""
    current: dict | None = None
    seen: set[str] = set()
    broken = None
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_HeaderWatch)
        for member in stream:
            if not member.isreg():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            ext = _IMAGE_EXT_ALIASES.get(ext.lower(), ext.lower())
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield _finish(current)
                current = _empty_row(key, url)
                if key in seen:
                    _fail(current, "duplicate_member", "members not adjacent in the tar")
                seen.add(key)
            data = stream.extractfile(member).read()
            if ext in REFUSED_EXTENSIONS:
                _fail(current, "refused_member", f"refusing .{ext} member (shards are never "
                      "unpickled; store images and JSON only)")
            elif ext in IMAGE_EXTENSIONS:
                if current["image"] is not None:
                    _fail(current, "duplicate_member", "two image members")
                current["image"], current["ext"] = data, ext
            elif ext == "json":
                current["json"] = data
        broken = _broken_end(stream)
    except (tarfile.TarError, EOFError, OSError) as exc:
        broken = str(exc) or type(exc).__name__
    if current is not None:
        if broken and (current["image"] is None or current["json"] is None):
            _fail(current, "truncated_sample", f"the shard breaks off here ({broken})")
        yield _finish(current)
    if broken:
        row = _empty_row("", url)
        row["error"] = skip_error("corrupt_shard", f"shard {url} is truncated or corrupt: {broken}")
        yield row


class ShardDatasource(FileBasedDatasource):
    """Reads ``shard-*.tar`` files (local paths or ``s3://``/``gs://`` URIs via pyarrow).

    Without ``decode`` it yields the rows above. With ``decode`` (a
    :class:`~dinor1.data.transforms.DecodeSample`) each read task decodes its rows as it reads
    them and yields a decoded block as soon as its images hold ``block_bytes`` (Ray's target
    block size, so each block is one Arrow chunk): the first block of a shard is out after a
    few dozen samples, not after the whole shard, and there is no second operator.
    """

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths, *, decode=None, block_bytes: int = 16 * 2**20, **kwargs):
        super().__init__(paths, **kwargs)
        self._decode, self._block_bytes = decode, block_bytes

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = iter_shard_rows(f, path)
        if self._decode is None:
            for chunk in _chunks(rows, lambda row: 1, _CHUNK_ROWS):
                yield pa.Table.from_pylist(chunk, schema=ROW_SCHEMA)
            return
        decoded = (self._decode.decode_row(row) for row in rows)
        for chunk in _chunks(decoded, lambda row: row["image"].nbytes, self._block_bytes):
            yield BlockAccessor.batch_to_block(self._decode.columns(chunk))


def _chunks(items: Iterator[dict], weight, limit: float) -> Iterator[list[dict]]:
    """``items`` in consecutive lists, each closed once its ``weight`` sum reaches ``limit``."""
    chunk, total = [], 0
    for item in items:
        chunk.append(item)
        total += weight(item)
        if total >= limit:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


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
