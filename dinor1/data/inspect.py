"""``dinor1 data inspect``: counts, checksum verification, category histogram, sample grid."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from dinor1.data.datasource import iter_shard_rows
from dinor1.data.pipeline import open_shard_set
from dinor1.data.quality import skip_error
from dinor1.data_pipelines.annotations import clean_annotations

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


class _HashingReader:
    """File-like wrapper that hashes what the tar reader consumes (one pass: read + verify)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n=-1):
        data = self.f.read(n) if n is not None and n >= 0 else self.f.read()
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def inspect_shards(location: str, *, grid_path: str | None = None, grid_samples: int = 16,
                   seed: int = 0) -> dict:
    """Read every shard once; returns a report dict (and writes a PNG grid when asked)."""
    shard_set = open_shard_set(location)
    manifest = shard_set.manifest or {}
    expected = {e["name"]: e for e in manifest.get("shards", [])}
    names = manifest.get("categories", {})
    report = {"location": location, "shards": [], "num_samples": 0, "num_boxes": 0,
              "errors": [], "checksum_failures": [], "categories": Counter()}
    rng = random.Random(seed)
    reservoir: list[tuple[bytes, dict]] = []
    seen = 0
    for path in shard_set.paths:
        name = path.rsplit("/", 1)[-1]
        with shard_set.filesystem.open_input_stream(path) as raw:
            reader = _HashingReader(raw)
            count = 0
            for row in iter_shard_rows(reader, path):
                if row["error"]:
                    report["errors"].append(row["error"])
                    continue
                try:
                    meta = json.loads(row["json"])
                    anns = meta["annotations"]
                    if not isinstance(anns, list):
                        raise TypeError(f"annotations is {type(anns).__name__}, not a list")
                except (ValueError, KeyError, TypeError) as exc:
                    report["errors"].append(skip_error(
                        "bad_json", f"sample {row['__key__']!r} in {path}: bad annotation JSON "
                        f"({type(exc).__name__}: {exc})"))
                    continue
                count += 1
                report["num_boxes"] += len(anns)
                report["categories"].update(_category_key(a) for a in anns)
                seen += 1  # reservoir sampling keeps memory bounded on large sets
                if len(reservoir) < grid_samples:
                    reservoir.append((row["image"], meta))
                elif (j := rng.randrange(seen)) < grid_samples:
                    reservoir[j] = (row["image"], meta)
            digest = reader.drain()
        entry = expected.get(name)
        ok = None if entry is None else entry["sha256"] == digest
        if ok is False:
            report["checksum_failures"].append(name)
        if entry is not None and entry["num_samples"] != count:
            report["errors"].append(
                f"{name}: manifest says {entry['num_samples']} samples, read {count}")
        report["shards"].append({"name": name, "num_samples": count, "sha256_ok": ok})
        report["num_samples"] += count
    report["categories"] = {
        f"{cid} {names.get(str(cid), '?')}": n
        for cid, n in sorted(report["categories"].items(), key=lambda kv: -kv[1])
    }
    if grid_path:
        _draw_grid(reservoir, names, grid_path)
        report["grid"] = str(grid_path)
    return report


def _category_key(annotation) -> object:
    """An annotation's category id as a histogram key (malformed ones by their repr)."""
    category = annotation.get("category_id") if isinstance(annotation, dict) else None
    return category if isinstance(category, (int, str, type(None))) else repr(category)


def _draw_grid(samples: list[tuple[bytes, dict]], names: dict, path: str, tile: int = 256):
    cols = max(1, int(len(samples) ** 0.5 + 0.999))
    rows = max(1, -(-len(samples) // cols))
    canvas = Image.new("RGB", (cols * tile, rows * tile), (32, 32, 32))
    for i, (data, meta) in enumerate(samples):
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:  # a damaged sample still gets its tile, marked
            img = Image.new("RGB", (tile, tile), (90, 0, 0))
            ImageDraw.Draw(img).text((8, 8), f"undecodable: {meta.get('image_id')}")
        # the boxes training would use: malformed ones left out, partly outside ones clipped
        anns = [a for a in meta["annotations"] if isinstance(a, dict)]
        ids = {c for a in anns if isinstance(c := a.get("category_id"), int)}
        anns = clean_annotations(anns, img.width, img.height, ids, Counter())
        scale = tile / max(img.size)
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
        draw = ImageDraw.Draw(img)
        for ann in anns:
            x, y, w, h = (v * scale for v in ann["bbox"])
            color = _PALETTE[hash(ann["category_id"]) % len(_PALETTE)]
            draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
            draw.text((x + 2, y + 1), str(names.get(str(ann["category_id"]), ann["category_id"])),
                      fill=color)
        canvas.paste(img, ((i % cols) * tile, (i // cols) * tile))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def format_inspect_report(report: dict, top: int = 20) -> str:
    lines = [f"{report['location']}: {report['num_samples']} samples, {report['num_boxes']} "
             f"boxes in {len(report['shards'])} shards"]
    verified = [s for s in report["shards"] if s["sha256_ok"] is not None]
    lines.append(f"checksums: {len(verified) - len(report['checksum_failures'])}/{len(verified)} "
                 "match the manifest" + (f"; MISMATCH: {report['checksum_failures']}"
                                         if report["checksum_failures"] else ""))
    if report["errors"]:
        lines.append(f"unreadable samples: {len(report['errors'])} (first: {report['errors'][0]})")
    lines.append("boxes per category:")
    for name, n in list(report["categories"].items())[:top]:
        lines.append(f"  {n:8d}  {name}")
    if len(report["categories"]) > top:
        lines.append(f"  ... {len(report['categories']) - top} more categories")
    if report.get("grid"):
        lines.append(f"sample grid: {report['grid']}")
    return "\n".join(lines)


__all__ = ["format_inspect_report", "inspect_shards"]
