"""Write a converted dataset as WebDataset shards plus a manifest, in parallel and restartably.

Every converter turns its source into a :class:`ConversionSource` (categories plus one
:class:`SourceRecord` per image); :func:`write_shards` does the rest:

- plans the shards deterministically (records sorted by key, ``samples_per_shard`` each) and
  fingerprints each shard's plan (its records and the converter version);
- skips shards that a previous run completed: same fingerprint in ``manifest.json``, and the file
  on disk has the recorded size and sha256;
- writes the others in a process pool, each to a hidden temporary file renamed into place only
  when complete, so an interrupted run never leaves a half-written shard under its final name;
- rewrites ``manifest.json`` (atomically) after every finished shard, with ``"complete": false``
  until the last one is done.

Tar members are written with fixed metadata (mtime 0, uid 0), so the same input gives
byte-identical shards and stable checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dinor1.data_pipelines.annotations import clean_annotations
from dinor1.data_pipelines.shard_format import (
    CONVERTER_VERSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    SHARD_RE,
    read_manifest,
    sample_key,
    sha256_file,
    write_json_atomic,
)

# PIL format name -> member extension for bytes kept as they are.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


@dataclass
class SourceRecord:
    """One source image and its raw annotations (COCO xywh boxes, before cleaning)."""

    image_id: int
    file_name: str
    path: str
    width: int | None = None
    height: int | None = None
    annotations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return sample_key(self.image_id)


@dataclass
class ConversionSource:
    """What a converter hands to :func:`write_shards`."""

    dataset: str
    split: str
    categories: list[dict]
    records: list[SourceRecord]
    source_paths: list[str]
    stats: Counter = field(default_factory=Counter)
    manifest_extra: dict = field(default_factory=dict)


def _fingerprint(records: list[SourceRecord], category_ids: list[int]) -> str:
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}|{category_ids}".encode())
    for record in records:
        digest.update(json.dumps(asdict(record), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _load_image(path: str, stats: Counter) -> tuple[bytes, str, int, int] | None:
    """Read and fully decode an image; returns (bytes, extension, width, height) or None."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        stats["missing_image"] += 1
        return None
    except OSError:
        stats["unreadable_image"] += 1
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: catches truncated files that a header check misses
            width, height, fmt = img.width, img.height, img.format
            ext = _KEPT_FORMATS.get(fmt)
            if ext is None:  # e.g. BMP or WebP: store as PNG so readers see one of two formats
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
                stats["reencoded_image"] += 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        stats["unreadable_image"] += 1
        return None
    return data, ext, width, height


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_one_shard(
    records: list[SourceRecord], category_ids: list[int], path: str
) -> tuple[int, Counter]:
    """Write one shard atomically; returns (samples written, skip/repair counts)."""
    stats: Counter = Counter()
    valid_ids = set(category_ids)
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    written = 0
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for record in records:
            loaded = _load_image(record.path, stats)
            if loaded is None:
                continue
            data, ext, width, height = loaded
            if (record.width, record.height) not in ((None, None), (width, height)):
                stats["size_mismatch"] += 1
            sample = {
                "image_id": record.image_id,
                "file_name": record.file_name,
                "width": width,
                "height": height,
                "annotations": clean_annotations(
                    record.annotations, width, height, valid_ids, stats
                ),
                **record.extra,
            }
            _add_member(tar, f"{record.key}.{ext}", data)
            _add_member(tar, f"{record.key}.json", json.dumps(sample).encode())
            written += 1
    os.replace(tmp, final)
    return written, stats


def _plan(source: ConversionSource, samples_per_shard: int) -> list[list[SourceRecord]]:
    records = sorted(source.records, key=lambda r: r.key)
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"two images map to the same shard key {dup!r}")
    return [records[i : i + samples_per_shard] for i in range(0, len(records), samples_per_shard)]


def _reusable(entry: dict | None, fingerprint: str, path: Path) -> bool:
    if entry is None or entry.get("fingerprint") != fingerprint or not path.exists():
        return False
    return path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry.get("sha256")


# A planned shard: (its name, its records, its plan's fingerprint).
_PendingShard = tuple[str, list[SourceRecord], str]


def _remove_stale_files(out: Path, names: list[str]) -> None:
    """Delete leftovers of an interrupted or larger earlier run: hidden temporary shard files and
    shards beyond the current plan."""
    for stale in out.iterdir():
        hidden_tmp = stale.name.startswith(".shard-") and ".tmp-" in stale.name
        if hidden_tmp or (SHARD_RE.match(stale.name) and stale.name not in names):
            stale.unlink()


class _ManifestWriter:
    """The manifest of one :func:`write_shards` call: a fixed header from the source plus one
    entry per finished shard, rewritten atomically after every shard."""

    def __init__(self, source: ConversionSource, out: Path, names: list[str]):
        self.source = source
        self.out = out
        self.names = names
        self.entries: dict[str, dict] = {}
        self.manifest = {
            "format": "dinor1-webdataset",
            "converter_version": CONVERTER_VERSION,
            "dataset": source.dataset,
            "split": source.split,
            "categories": {str(c["id"]): c["name"] for c in source.categories},
            "category_attributes": {
                str(c["id"]): {k: v for k, v in c.items() if k not in ("id", "name")}
                for c in source.categories
            },
            "source_paths": [str(p) for p in source.source_paths],
            **source.manifest_extra,
        }

    def save(self, complete: bool) -> dict:
        shards = [self.entries[n] for n in self.names if n in self.entries]
        skipped = Counter(self.source.stats)
        for entry in shards:
            skipped.update(entry.get("skipped", {}))
        self.manifest.update(
            complete=complete,
            num_samples=sum(e["num_samples"] for e in shards),
            num_source_images=(
                len(self.source.records) + self.source.stats.get("duplicate_image_id", 0)
            ),
            shards=shards,
            skipped=dict(sorted(skipped.items())),
            updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_json_atomic(self.out / MANIFEST_NAME, self.manifest)
        return self.manifest

    def finish(self, name: str, fp: str, written: int, stats: Counter) -> None:
        """Record a shard just written (its size and checksum) and save the manifest."""
        path = self.out / name
        self.entries[name] = {
            "name": name,
            "num_samples": written,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "fingerprint": fp,
            "skipped": dict(stats),
        }
        self.save(complete=False)


def _reuse_finished_shards(
    previous: dict, planned: list[_PendingShard], manifest: _ManifestWriter
) -> list[_PendingShard]:
    """Put the shards that ``previous`` (the old manifest) already completed with the same plan
    into ``manifest``; returns the others, still to write."""
    old_entries = {e["name"]: e for e in previous.get("shards", [])}
    todo = []
    for name, chunk, fp in planned:
        if _reusable(old_entries.get(name), fp, manifest.out / name):
            manifest.entries[name] = old_entries[name]
        else:
            todo.append((name, chunk, fp))
    return todo


def _write_serially(
    todo: list[_PendingShard],
    category_ids: list[int],
    out: Path,
    manifest: _ManifestWriter,
    bar: tqdm,
) -> None:
    """Write the shards one after another in this process."""
    for name, chunk, fp in todo:
        manifest.finish(name, fp, *write_one_shard(chunk, category_ids, str(out / name)))
        bar.update(len(chunk))


def _write_in_pool(
    todo: list[_PendingShard],
    category_ids: list[int],
    out: Path,
    num_workers: int,
    manifest: _ManifestWriter,
    bar: tqdm,
) -> None:
    """Write the shards in ``num_workers`` spawned processes, recording each as it finishes."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
        futures = {}
        for name, chunk, fp in todo:
            future = pool.submit(write_one_shard, chunk, category_ids, str(out / name))
            futures[future] = (name, fp, len(chunk))
        for future in as_completed(futures):
            name, fp, size = futures[future]
            manifest.finish(name, fp, *future.result())
            bar.update(size)


def write_shards(
    source: ConversionSource,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write ``source`` as shards under ``out_dir``; returns the final manifest.

    Args:
        source: the converter's output.
        out_dir: local folder for ``shard-%06d.tar`` and ``manifest.json``; created if needed.
        samples_per_shard: images per shard (the last shard holds the rest).
        num_workers: processes writing shards in parallel (1 = in this process).
        progress: show a progress bar over samples.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    category_ids = sorted(int(c["id"]) for c in source.categories)
    plan = _plan(source, samples_per_shard)
    names = [SHARD_PATTERN % i for i in range(len(plan))]
    fingerprints = [_fingerprint(chunk, category_ids) for chunk in plan]

    previous = read_manifest(out) or {}
    _remove_stale_files(out, names)
    manifest = _ManifestWriter(source, out, names)
    todo = _reuse_finished_shards(previous, list(zip(names, plan, fingerprints)), manifest)

    bar = tqdm(
        total=sum(len(c) for _, c, _ in todo),
        desc=f"{source.dataset}/{source.split}: {len(todo)} of {len(plan)} shards to write",
        unit="img",
        disable=not progress,
    )
    if num_workers <= 1 or len(todo) <= 1:
        _write_serially(todo, category_ids, out, manifest, bar)
    else:
        _write_in_pool(todo, category_ids, out, num_workers, manifest, bar)
    bar.close()
    return manifest.save(complete=True)


def format_report(manifest: dict) -> str:
    """A short human summary of a finished conversion."""
    lines = [
        f"{manifest['dataset']}/{manifest['split']}: {manifest['num_samples']} samples in "
        f"{len(manifest['shards'])} shards, {len(manifest['categories'])} categories"
    ]
    skipped = {k: v for k, v in manifest.get("skipped", {}).items() if v}
    if skipped:
        lines.append("  skipped or repaired: " + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    return "\n".join(lines)
