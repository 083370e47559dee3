"""A shard folder mixing good samples with every kind of bad input, and the counts the pipeline
must report for it (usable as train, val and support shards)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from dinor1.data.quality import DROP_RULES, SKIP_KINDS
from dinor1.data_pipelines.shard_format import MANIFEST_NAME, SHARD_PATTERN, sample_key
from tests.helpers import write_tar

CATEGORIES = {1: "cat", 2: "dog", 5: "bird"}
SIZES = ((64, 48), (80, 64), (96, 96), (72, 56))  # (width, height) of the good images

# Annotations attached to good samples: each is dropped by its rule, or clipped and kept.
BAD_BOXES = (
    ("invalid_box", {"bbox": [1, math.nan, 5, 5], "category_id": 1}),
    ("invalid_box", {"bbox": [2, 2, -5, 4], "category_id": 2}),
    ("invalid_box", {"bbox": [2, 2, 0, 4], "category_id": 1}),
    ("invalid_box", {"bbox": [2, 2, 5], "category_id": 1}),
    ("invalid_box", {"bbox": "2255", "category_id": 1}),
    ("invalid_box", "not an annotation"),
    ("invalid_box", {"bbox": [1, 1, math.inf, 5], "category_id": 5}),
    ("box_outside_image", {"bbox": [200, 10, 10, 10], "category_id": 1}),
    ("box_outside_image", {"bbox": [-30, 5, 10, 10], "category_id": 2}),
    ("unknown_category", {"bbox": [2, 2, 8, 8], "category_id": 99}),
    ("unknown_category", {"bbox": [2, 2, 8, 8], "category_id": [1]}),
    ("unknown_category", {"bbox": [2, 2, 8, 8]}),
    ("clipped", {"bbox": [50, 30, 40, 40], "category_id": 5}),
    ("clipped", {"bbox": [-4, -4, 12, 12], "category_id": 1}),
)


def _image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _meta(image_id: int, annotations: list) -> bytes:
    return json.dumps({"image_id": image_id, "annotations": annotations}).encode()


def _tar_size(samples: list[list[tuple[str, bytes]]]) -> int:
    """Bytes the samples' members take in a tar (512-byte header + data padded to 512 each)."""
    return sum(512 + -(-len(data) // 512) * 512 for sample in samples for _, data in sample)


class _Builder:
    """Makes samples and keeps the counts the pipeline must report for them."""

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.next_id = 1
        self.good_boxes: dict[int, int] = {}  # image id -> boxes kept after cleaning
        self.skipped = dict.fromkeys(SKIP_KINDS, 0)
        self.skipped_keys: dict[str, list[str]] = {k: [] for k in SKIP_KINDS}
        self.dropped = dict.fromkeys(DROP_RULES, 0)
        self.clipped = 0

    def good(self, bad_boxes: tuple = (), valid: bool = True) -> list[tuple[str, bytes]]:
        """A decodable sample with 1-3 valid boxes (none unless ``valid``) plus ``bad_boxes``
        ((rule, annotation)s)."""
        image_id = self.next_id
        self.next_id += 1
        width, height = SIZES[image_id % len(SIZES)]
        ids = sorted(CATEGORIES)
        annotations = []
        for n in range(1 + image_id % 3 if valid else 0):
            w, h = (float(v) for v in self.rng.integers(4, 20, 2))
            x, y = float(self.rng.integers(0, width - 20)), float(self.rng.integers(0, height - 20))
            annotations.append({"id": image_id * 10 + n, "bbox": [x, y, w, h],
                                "category_id": ids[(image_id + n) % len(ids)], "iscrowd": 0})
        self.good_boxes[image_id] = len(annotations)
        for rule, annotation in bad_boxes:
            annotations.append(annotation)
            if rule == "clipped":
                self.clipped += 1
                self.good_boxes[image_id] += 1
            else:
                self.dropped[rule] += 1
        key = sample_key(image_id)
        return [(f"{key}.jpg", _image_bytes(width, height, image_id)),
                (f"{key}.json", _meta(image_id, annotations))]

    def lose(self, sample: list[tuple[str, bytes]], kind: str | None = None) -> int:
        """A good sample (without bad boxes) the pipeline never sees whole; counted under
        ``kind`` if given. Returns its image id."""
        key = sample[0][0].split(".")[0]
        image_id = int(key)
        del self.good_boxes[image_id]
        if kind:
            self.bad(kind, key, [])
        return image_id

    def bad(self, kind: str, key: str, members: list[tuple[str, bytes]]):
        self.skipped[kind] += 1
        self.skipped_keys[kind].append(key)
        return members


def build_fuzzed_shards(root: Path, num_good: int = 40) -> tuple[Path, dict]:
    """``root/shards``: ``num_good`` (at least 16) good samples (64x48 to 96x96 JPEGs, 1-3 valid
    boxes each, categories 1 cat, 2 dog, 5 bird) mixed with every kind of bad input, in known
    numbers.

    Shards 0-3 interleave good samples with bad ones (some good samples carry bad boxes; one
    has nothing but bad boxes and is kept with none; sample 1's JSON comes back at the end of
    shard 0 as a ``duplicate_member``); shard 4 breaks off inside an image member (the two
    complete samples before the cut survive, the cut one is a ``truncated_sample``, the two
    after it are lost unseen); shard 5 stops between two samples without the end-of-archive
    marker (both survive); shard 6 is a valid tar with no members (counts nothing); shard 7 has
    zero bytes and shard 8 is not a tar. Shards 4, 5, 7 and 8 count one ``corrupt_shard`` each.
    The manifest's ``num_samples`` is the number of good samples.

    Returns:
        (the shard folder, expected) where expected holds ``good_image_ids`` (sorted),
        ``skipped`` ({kind: n} for every kind of ``SKIP_KINDS``), ``skipped_samples``,
        ``skipped_keys`` ({kind: sample keys, or shard file names for ``corrupt_shard``}),
        ``dropped`` ({rule: n} for every rule of ``DROP_RULES``), ``dropped_boxes``,
        ``clipped_boxes``, ``kept_boxes`` (ground-truth boxes after cleaning),
        ``lost_image_ids`` (after the cut in shard 4: never seen, never counted),
        ``num_rows`` (rows the reader yields: good + skipped; 62 by default, even, so Ray
        Train's equal split over 2 workers drops none) and ``categories``.
        :func:`expected_metrics` turns it into metric names.
    """
    if num_good < 16:
        raise ValueError("num_good must be at least 16")
    out = root / "shards"
    out.mkdir(parents=True)
    b = _Builder()
    jpeg = _image_bytes(64, 48, seed=999)
    png = _image_bytes(64, 48, seed=998, fmt="PNG")
    meta = _meta(5000, [{"bbox": [1, 1, 8, 8], "category_id": 1}])
    bad_samples = [
        b.bad("bad_image", "trunc_jpg", [("trunc_jpg.jpg", jpeg[: len(jpeg) // 2]),
                                         ("trunc_jpg.json", meta)]),
        b.bad("bad_image", "trunc_png", [("trunc_png.png", png[: len(png) // 2]),
                                         ("trunc_png.json", meta)]),
        b.bad("bad_image", "garbage_img", [("garbage_img.jpg", b"\xff\xd8\xff garbage" * 20),
                                           ("garbage_img.json", meta)]),
        b.bad("bad_image", "empty_img", [("empty_img.jpg", b""), ("empty_img.json", meta)]),
        b.bad("bad_json", "not_json", [("not_json.jpg", jpeg), ("not_json.json", b"{not json")]),
        b.bad("bad_json", "no_image_id", [("no_image_id.jpg", jpeg),
                                          ("no_image_id.json", b'{"annotations": []}')]),
        b.bad("bad_json", "no_annotations", [("no_annotations.jpg", jpeg),
                                             ("no_annotations.json", b'{"image_id": 5001}')]),
        b.bad("bad_json", "anns_not_list", [
            ("anns_not_list.jpg", jpeg),
            ("anns_not_list.json", b'{"image_id": 5002, "annotations": 7}')]),
        b.bad("bad_json", "id_not_int", [
            ("id_not_int.jpg", jpeg),
            ("id_not_int.json", b'{"image_id": "abc", "annotations": []}')]),
        b.bad("bad_json", "id_infinite", [
            ("id_infinite.jpg", jpeg),
            ("id_infinite.json", b'{"image_id": Infinity, "annotations": []}')]),
        b.bad("bad_json", "json_list", [("json_list.jpg", jpeg), ("json_list.json", b"[1, 2]")]),
        b.bad("bad_json", "not_utf8", [("not_utf8.jpg", jpeg),
                                       ("not_utf8.json", b"\xff\xfe\x00{")]),
        b.bad("missing_image", "no_img", [("no_img.json", meta)]),
        b.bad("missing_json", "no_json", [("no_json.jpg", jpeg)]),
        b.bad("refused_member", "pickled", [("pickled.jpg", jpeg), ("pickled.pkl", b"\x80\x04."),
                                            ("pickled.json", meta)]),
        b.bad("duplicate_member", "two_images", [("two_images.jpg", jpeg),
                                                 ("two_images.png", png),
                                                 ("two_images.json", meta)]),
    ]
    box_sets = [BAD_BOXES[i:i + 2] for i in range(0, len(BAD_BOXES), 2)]
    good = [b.good(box_sets[i] if i < len(box_sets) else ()) for i in range(num_good - 5)]
    good.append(b.good(BAD_BOXES[:3], valid=False))  # kept, with no box left
    for shard in range(4):
        samples = good[shard::4]
        bad_members = [m for sample in bad_samples[shard::4] for m in sample]
        half = len(samples) // 2
        members = [m for s in samples[:half] for m in s] + bad_members + \
            [m for s in samples[half:] for m in s]
        if shard == 0:  # the first sample's key again, after other keys
            key = samples[0][0][0].split(".")[0]
            members.append(b.bad("duplicate_member", key, [(f"{key}.json", _meta(6000, []))])[0])
        write_tar(out / (SHARD_PATTERN % shard), members)

    path = out / (SHARD_PATTERN % 4)
    survivors, cut, lost = [b.good(), b.good()], b.good(), [b.good(), b.good()]
    b.lose(cut, "truncated_sample")
    lost_ids = [b.lose(sample) for sample in lost]
    write_tar(path, [m for s in survivors + [cut] + lost for m in s])
    path.write_bytes(path.read_bytes()[: _tar_size(survivors) + 512 + len(cut[0][1]) // 2])

    path = out / (SHARD_PATTERN % 5)
    tail = [b.good(), b.good()]
    write_tar(path, [m for s in tail for m in s])
    path.write_bytes(path.read_bytes()[: _tar_size(tail)])  # no end-of-archive blocks
    write_tar(out / (SHARD_PATTERN % 6), [])
    (out / (SHARD_PATTERN % 7)).write_bytes(b"")
    (out / (SHARD_PATTERN % 8)).write_bytes(b"this is not a tar file\n" * 40)
    for shard in (4, 5, 7, 8):
        b.bad("corrupt_shard", SHARD_PATTERN % shard, [])

    manifest = {"format": "dinor1-webdataset", "dataset": "fuzz", "split": "val",
                "categories": {str(k): v for k, v in CATEGORIES.items()},
                "category_attributes": {}, "num_samples": len(b.good_boxes)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    expected = {
        "good_image_ids": sorted(b.good_boxes),
        "skipped": b.skipped,
        "skipped_samples": sum(b.skipped.values()),
        "skipped_keys": b.skipped_keys,
        "dropped": b.dropped,
        "dropped_boxes": sum(b.dropped.values()),
        "clipped_boxes": b.clipped,
        "kept_boxes": sum(b.good_boxes.values()),
        "lost_image_ids": lost_ids,
        "num_rows": len(b.good_boxes) + sum(b.skipped.values()),
        "categories": dict(CATEGORIES),
    }
    return out, expected


def expected_metrics(expected: dict, prefix: str = "data/", epochs: int = 1) -> dict[str, float]:
    """The :meth:`~dinor1.data.quality.QualityCounter.metrics` that reading the shards
    ``epochs`` times must produce."""
    out = {f"{prefix}skipped_samples": expected["skipped_samples"]}
    out.update({f"{prefix}skipped/{k}": n for k, n in expected["skipped"].items()})
    out[f"{prefix}dropped_boxes"] = expected["dropped_boxes"]
    out.update({f"{prefix}dropped_boxes/{r}": n for r, n in expected["dropped"].items()})
    out[f"{prefix}clipped_boxes"] = expected["clipped_boxes"]
    return {k: float(n * epochs) for k, n in out.items()}
