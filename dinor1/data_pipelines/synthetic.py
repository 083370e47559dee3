"""A synthetic visual-prompt detection dataset, written as a real COCO dataset on disk.

Scenes are cluttered images of coloured shapes. A category is a (shape, colour) pair such as
"red star"; everything else is nuisance that a detector has to see through: size
(``min_scale``..``max_scale`` of the image side), rotation, a mild aspect stretch, a small
brightness/hue jitter around the category colour, and a texture drawn in a darker or lighter
shade of that colour (solid, stripes, checker, dots). The background is a desaturated gradient
with smooth blotches and low-contrast noise, plus up to ``num_distractors`` unlabelled items
(thin lines, grey or brown shapes, small blobs) in colours that no category uses, so that shape
alone never identifies an object. Objects are placed one after another and may partially hide
earlier ones: boxes overlap by at most ``max_overlap_iou`` and every object keeps at least 30%
of its pixels visible. Annotations describe what is visible: ``bbox`` is the tight box of the
visible pixels and ``area`` their count.

Splits:

* ``train``: seen categories only (the first ``num_categories - num_novel``).
* ``val``: all categories, so novel ones measure open-set detection.
* ``support``: all categories; image ``i`` always contains category ``i % num_categories``,
  the pool from which "N instances per class" visual prompts are drawn.
* ``test`` (only with ``num_test > 0``): like ``val``, drawn independently of it: a split to
  report on after settings were chosen on ``val``.

Settings for a benchmark where generalisation matters (their defaults keep the demo's data):
``num_novel`` classes held out of training; ``long_tail`` > 0 draws the train split's objects
from a long-tailed class frequency (class ``k`` of the seen ones has weight ``(k + 1) **
-long_tail``; val, test and support stay uniform) and labels every category ``frequency`` r/c/f
by the number of train images it occurs in, with LVIS's thresholds scaled to the split's size
(LVIS: rare 1-10, common 11-100 images of ~100k; here a fraction ``rare_fraction`` and
``10 * rare_fraction`` of ``num_train``), so that scoring reports APr/APc/APf as LVIS does;
``num_hard_distractors`` adds unlabelled objects whose (shape, colour) pair is no category's
but whose shape and colour each belong to some category, so that neither alone identifies an
object. Prompts from other images are what generic prompts are (built from the support split).

Every image comes from its own random generator seeded by (seed, split, index), so the output,
JSON and image bytes alike, does not depend on ``num_workers`` or on earlier runs.

Layout::

    out_dir/images/{train,val,support}/000000000001.png     (zero-padded image id)
    out_dir/annotations/instances_{train,val,support}.json
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
          "pentagon", "crescent", "arrow", "heart")
COLOURS = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 75, 225),
    "yellow": (235, 210, 35), "magenta": (205, 45, 200), "cyan": (35, 200, 215),
    "orange": (245, 135, 25), "purple": (115, 45, 170),
}
# Greys and dark browns: far from every category colour even after jitter and shading.
DISTRACTOR_COLOURS = ((70, 70, 70), (120, 120, 120), (170, 170, 170), (210, 210, 210),
                      (95, 65, 40), (75, 55, 40))
SPLITS = ("train", "val", "support", "test")  # (the index seeds each image)
MIN_VISIBLE = 0.3   # fraction of an object's pixels that must stay visible under later objects
MIN_PIXELS = 8      # smallest annotated object (visible pixels)
PLACEMENT_TRIES = 20
GENERATOR_VERSION = 2  # bump when drawing changes, so cached datasets are regenerated
_IMAGE_NAME = re.compile(r"^\d{12}\.(png|jpg)$")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic dataset (see the module docstring)."""

    seed: int = 0
    image_size: int = 128            # square images, pixels
    num_train: int = 2000
    num_val: int = 200
    num_support: int = 100
    num_categories: int = 8          # total categories (seen + novel)
    num_novel: int = 2               # the last num_novel categories never appear in train
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.12          # object size as a fraction of image_size
    max_scale: float = 0.4
    max_overlap_iou: float = 0.4     # box IoU allowed with any earlier object (occlusion)
    num_distractors: int = 2         # at most this many unlabelled clutter items per image
    image_format: str = "png"        # "png" or "jpg"
    num_test: int = 0                # a held-out test split like val (0: none)
    long_tail: float = 0.0           # train class frequency exponent (0: uniform)
    rare_fraction: float = 0.01      # rare: in at most this fraction of train images
    num_hard_distractors: int = 0    # at most this many unlabelled near-miss objects per image

    def __post_init__(self):
        def check(name, ok, why):
            if not ok:
                raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)!r} {why}")

        for name in ("seed", "image_size", "num_train", "num_val", "num_support",
                     "num_categories", "num_novel", "min_objects", "max_objects",
                     "num_distractors", "num_test", "num_hard_distractors"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool),
                  "must be an integer")
        for name in ("min_scale", "max_scale", "max_overlap_iou", "long_tail",
                     "rare_fraction"):
            value = getattr(self, name)
            check(name, isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value), "must be a finite number")
        check("seed", self.seed >= 0, "must be >= 0")
        check("image_size", 32 <= self.image_size <= 4096, "must be in 32..4096")
        for name in ("num_train", "num_val", "num_support", "num_distractors", "num_test",
                     "num_hard_distractors"):
            check(name, getattr(self, name) >= 0, "must be >= 0")
        most = len(SHAPES) * len(COLOURS)
        check("num_categories", 1 <= self.num_categories <= most, f"must be in 1..{most}")
        check("num_novel", 0 <= self.num_novel < self.num_categories,
              f"must be >= 0 and < num_categories={self.num_categories}")
        check("min_objects", self.min_objects >= 1, "must be >= 1")
        check("max_objects", self.min_objects <= self.max_objects <= 100,
              f"must be >= min_objects={self.min_objects} and <= 100")
        check("min_scale", self.min_scale > 0 and self.min_scale * self.image_size >= 6,
              f"must give objects of at least 6 px (image_size={self.image_size})")
        check("max_scale", self.min_scale <= self.max_scale <= 1,
              f"must be >= min_scale={self.min_scale} and <= 1")
        check("max_overlap_iou", 0 <= self.max_overlap_iou <= 1, "must be in [0, 1]")
        check("image_format", self.image_format in ("png", "jpg"), "must be 'png' or 'jpg'")
        check("long_tail", 0 <= self.long_tail <= 5, "must be in [0, 5]")
        check("rare_fraction", 0 < self.rare_fraction <= 0.1, "must be in (0, 0.1]")
        check("num_hard_distractors", self.num_hard_distractors == 0
              or self.num_categories < most, f"needs num_categories < {most} (a (shape, colour) "
              "pair that is no category's)")


def category_table(num_categories: int) -> list[dict]:
    """The first ``num_categories`` categories, as COCO category dicts with ids from 1.

    Category ``k`` is shape ``k % 12`` in colour ``(k + 5 * (k // 12)) % 8``: the first eight
    differ in both shape and colour, and all 96 (shape, colour) pairs occur once. Each dict has
    ``id``, ``name`` ("red circle"), ``supercategory`` (the shape), ``shape`` and ``colour``.
    """
    most = len(SHAPES) * len(COLOURS)
    if not 1 <= num_categories <= most:
        raise ValueError(f"num_categories={num_categories} must be in 1..{most}")
    colours = list(COLOURS)
    table = []
    for k in range(num_categories):
        shape = SHAPES[k % len(SHAPES)]
        colour = colours[(k + 5 * (k // len(SHAPES))) % len(colours)]
        table.append({"id": k + 1, "name": f"{colour} {shape}", "supercategory": shape,
                      "shape": shape, "colour": colour})
    return table


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2, dx: float = 0.0):
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([dx + radius * np.cos(t), radius * np.sin(t)], 1)


def _outlines() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Shape -> (outline [N, 2], hole outline [M, 2] or None), roughly within the unit disc."""
    star = _regular(10)
    star[1::2] *= 0.45
    a = 0.34
    cross = np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                      (-a, a), (-1, a), (-1, -a), (-a, -a)], float) * 0.95
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    heart = np.stack([np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t)
                                         - np.cos(4 * t)) / 16 + 0.15], 1) * 0.95
    return {
        "circle": (_regular(32), None),
        "square": (_regular(4, phase=math.pi / 4), None),
        "triangle": (_regular(3) + [0, 0.2], None),
        "star": (star, None),
        "cross": (cross, None),
        "ring": (_regular(32), _regular(32, 0.55)),
        "diamond": (np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], float), None),
        "hexagon": (_regular(6, phase=0), None),
        "pentagon": (_regular(5) + [0, 0.1], None),
        "crescent": (_regular(32), _regular(32, 0.8, dx=0.45)),
        "arrow": (np.array([(-1, -0.28), (0.15, -0.28), (0.15, -0.75), (1, 0), (0.15, 0.75),
                            (0.15, 0.28), (-1, 0.28)], float), None),
        "heart": (heart, None),
    }


OUTLINES = _outlines()


def _shape_mask(shape: str, size: int, centre, radius: float, angle: float, aspect: float):
    """Rasterise one shape, clipped to the [size, size] image.

    Returns (mask, (x0, y0)): a boolean [h, w] mask of the shape's pixels within its bounding
    box, whose top-left pixel is (x0, y0); or None when the shape misses the image.
    """
    cos, sin = math.cos(angle), math.sin(angle)
    # row-vector points times (stretch, then rotate), then move
    linear = np.array([[aspect * cos, aspect * sin], [-sin / aspect, cos / aspect]]) * radius
    outline, hole = OUTLINES[shape]
    points = outline @ linear + centre
    x0, y0 = np.floor(np.maximum(points.min(0), 0)).astype(int)
    x1, y1 = np.ceil(np.minimum(points.max(0) + 1, size)).astype(int)
    if x1 <= x0 or y1 <= y0:
        return None
    image = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(image)
    draw.polygon([tuple(p) for p in (points - (x0, y0)).tolist()], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in (hole @ linear + centre - (x0, y0)).tolist()], fill=0)
    return np.asarray(image) > 127, (int(x0), int(y0))


def _texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray | None:
    """Boolean [h, w] pattern to shade (stripes, checker or dots), or None for solid."""
    kind = int(rng.integers(4))
    if kind == 0:
        return None
    period = float(rng.uniform(3, 7))
    phase = rng.uniform(0, period, 2)
    yy = np.arange(h, dtype=np.float32)[:, None] + phase[0]
    xx = np.arange(w, dtype=np.float32)[None, :] + phase[1]
    if kind == 1:
        theta = float(rng.uniform(0, math.pi))
        return ((xx * math.cos(theta) + yy * math.sin(theta)) / period) % 2 < 1
    if kind == 2:
        return ((xx // period + yy // period) % 2) == 0
    return (xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2 < (period / 3.2) ** 2


def _paint(canvas: np.ndarray, mask: np.ndarray, corner, colour, rng: np.random.Generator,
           shade_strength: float = 1.0) -> None:
    """Fill ``mask`` (top-left at ``corner`` of the float [S, S, 3] canvas) with a jittered,
    textured version of ``colour``."""
    base = (np.asarray(colour, np.float32) * rng.uniform(0.85, 1.12)
            + rng.uniform(-12, 12, 3).astype(np.float32))
    if rng.random() < 0.5:
        shade = base * (1 - 0.4 * shade_strength)
    else:
        shade = base + 0.3 * shade_strength * (255 - base)
    h, w = mask.shape
    pattern = _texture(h, w, rng)
    fill = np.broadcast_to(base, (h, w, 3)).copy()
    if pattern is not None:
        fill[pattern] = shade
    x0, y0 = corner
    canvas[y0:y0 + h, x0:x0 + w][mask] = np.clip(fill[mask], 0, 255)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float [S, S, 3]: desaturated gradient + smooth blotches + low-contrast noise."""
    ends = (rng.uniform(60, 200, (2, 1)) + rng.uniform(-15, 15, (2, 3))).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    t = np.clip(0.5 + coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta), 0, 1)
    image = ends[0] + t[..., None] * (ends[1] - ends[0])
    # mostly brightness, barely any hue: coloured blotches would look like objects
    blotch = rng.normal(0, 14, (5, 5, 1)) + rng.normal(0, 4, (5, 5, 3))
    blotch = np.clip(128 + blotch, 0, 255).astype(np.uint8)
    blotch = Image.fromarray(blotch).resize((size, size), Image.BILINEAR)
    image += np.asarray(blotch, np.float32) - 128
    image += rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
    return image


def _distractors(canvas: np.ndarray, config: SyntheticConfig, rng: np.random.Generator) -> None:
    """Unlabelled clutter, drawn under the objects: lines, grey/brown shapes, small blobs."""
    size = config.image_size
    for _ in range(int(rng.integers(0, config.num_distractors + 1))):
        colour = DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))]
        kind = int(rng.integers(3))
        if kind == 0:
            image = Image.new("L", (size, size), 0)
            ImageDraw.Draw(image).line(rng.uniform(0, size, 4).tolist(), fill=255,
                                       width=int(rng.integers(1, 3)))
            drawn = (np.asarray(image) > 127, (0, 0))
        else:
            if kind == 1:  # a shape from the category vocabulary, in a non-category colour
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                scale = rng.uniform(config.min_scale, config.max_scale)
            else:          # a blob too small to be an object
                shape, scale = "circle", rng.uniform(0.3, 0.8) * config.min_scale
            drawn = _shape_mask(shape, size, rng.uniform(0, size, 2), scale * size / 2,
                                rng.uniform(0, 2 * math.pi), rng.uniform(0.7, 1.4))
        if drawn is not None:
            _paint(canvas, *drawn, colour, rng, shade_strength=0.5)


def near_miss_pairs(categories: list[dict]) -> list[tuple[str, str]]:
    """(shape, colour) pairs that are no category's although their shape and their colour
    each are some category's: what hard distractors are drawn from."""
    taken = {(c["shape"], c["colour"]) for c in categories}
    shapes, colours = {c["shape"] for c in categories}, {c["colour"] for c in categories}
    return [(shape, colour) for shape in SHAPES for colour in COLOURS
            if shape in shapes and colour in colours and (shape, colour) not in taken]


def _hard_distractors(canvas: np.ndarray, index_map: np.ndarray, objects: list[dict],
                      config: SyntheticConfig, categories: list[dict],
                      rng: np.random.Generator) -> None:
    """Unlabelled near-miss objects drawn over the background only (never over an object, so
    every annotation stays as it is)."""
    pairs = near_miss_pairs(categories)
    if not pairs:
        return
    size = config.image_size
    for _ in range(int(rng.integers(0, config.num_hard_distractors + 1))):
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        radius = rng.uniform(config.min_scale, config.max_scale) * size / 2
        drawn = _shape_mask(shape, size, rng.uniform(0.7 * radius, size - 0.7 * radius, 2),
                            radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25))
        if drawn is None:
            continue
        mask, (x0, y0) = drawn
        window = index_map[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        if (window[mask] >= 0).any():
            continue
        _paint(canvas, mask, (x0, y0), COLOURS[colour], rng)


def frequency_labels(train_annotations: list[dict], num_train: int,
                     rare_fraction: float) -> dict[int, str]:
    """Category id -> "r", "c" or "f" by the number of train images it occurs in (LVIS's rule,
    scaled: rare up to ``rare_fraction`` of the images, common up to ten times that)."""
    images: dict[int, set] = {}
    for ann in train_annotations:
        images.setdefault(ann["category_id"], set()).add(ann["image_id"])
    rare, common = rare_fraction * num_train, 10 * rare_fraction * num_train
    return {cid: ("r" if len(ids) <= rare else "c" if len(ids) <= common else "f")
            for cid, ids in images.items()}


def _box_iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_scene(config: SyntheticConfig, split: str, index: int,
                 categories: list[dict] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Draw image ``index`` (0-based) of ``split``.

    Returns (image, annotations): a uint8 [S, S, 3] RGB array and COCO annotation dicts
    (``category_id``, ``bbox`` [x, y, w, h] of the visible pixels, ``area``, ``iscrowd``)
    without ``id``/``image_id``.
    """
    categories = categories or category_table(config.num_categories)
    size = config.image_size
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    allowed = categories[: len(categories) - config.num_novel] if split == "train" else categories
    canvas = _background(size, rng)
    _distractors(canvas, config, rng)

    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    if split == "train" and config.long_tail > 0:
        weights = np.arange(1, len(allowed) + 1, dtype=np.float64) ** -config.long_tail
        picks = rng.choice(len(allowed), size=wanted, p=weights / weights.sum())
        chosen = [allowed[int(k)] for k in picks]
    else:  # (the draws of the demo's data, unchanged)
        chosen = [allowed[int(rng.integers(len(allowed)))] for _ in range(wanted)]
    if split == "support":
        chosen[0] = categories[index % len(categories)]
    # index_map[y, x] = index of the object that owns the pixel (-1: background), painted in
    # the same order as the canvas so it always tells what is visible.
    index_map = np.full((size, size), -1, np.int16)
    objects: list[dict] = []  # category, full box, full and visible pixel counts
    for category in chosen:
        for attempt in range(PLACEMENT_TRIES + 1):
            scale = rng.uniform(config.min_scale, config.max_scale)
            if attempt == PLACEMENT_TRIES:
                if objects:
                    break
                scale = config.max_scale  # the first object (the support target) must exist
            radius = scale * size / 2
            centre = rng.uniform(0.7 * radius, size - 0.7 * radius, 2)  # allows mild truncation
            drawn = _shape_mask(category["shape"], size, centre, radius,
                                rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25))
            if drawn is None or drawn[0].sum() < MIN_PIXELS:
                continue
            mask, (x0, y0) = drawn
            ys, xs = np.nonzero(mask)
            box = (x0 + int(xs.min()), y0 + int(ys.min()),
                   x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            if any(_box_iou(box, o["box"]) > config.max_overlap_iou for o in objects):
                continue
            window = index_map[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
            covered = np.bincount(window[mask] + 1, minlength=len(objects) + 1)[1:].tolist()
            # rather than drop an earlier object's annotation, reject a placement hiding it
            if any(o["visible"] - c < max(MIN_VISIBLE * o["pixels"], MIN_PIXELS)
                   for o, c in zip(objects, covered)):
                continue
            for o, c in zip(objects, covered):
                o["visible"] -= c
            window[mask] = len(objects)
            objects.append({"category": category, "box": box, "pixels": len(xs),
                            "visible": len(xs)})
            _paint(canvas, mask, (x0, y0), COLOURS[category["colour"]], rng)
            break
    if not objects:
        raise RuntimeError(f"could not place any object in {split} image {index}")
    if config.num_hard_distractors:
        _hard_distractors(canvas, index_map, objects, config, categories, rng)

    annotations = []
    for j, o in enumerate(objects):
        x0, y0, x1, y1 = o["box"]
        ys, xs = np.nonzero(index_map[y0:y1, x0:x1] == j)
        left, top = x0 + int(xs.min()), y0 + int(ys.min())
        w, h = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
        annotations.append({"category_id": o["category"]["id"],
                            "bbox": [float(left), float(top), float(w), float(h)],
                            "area": float(len(xs)), "iscrowd": 0})
    return np.rint(np.clip(canvas, 0, 255)).astype(np.uint8), annotations


def _render_and_write(task) -> tuple[str, list[dict]]:
    config, split, index, categories, folder = task
    image, annotations = render_scene(config, split, index, categories)
    name = f"{index + 1:012d}.{config.image_format}"
    # same-folder temp name + rename: a reader never sees a half-written image
    tmp = Path(folder) / f".{name}.{os.getpid()}.tmp"
    if config.image_format == "png":
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)  # 1.6x faster
    else:
        Image.fromarray(image).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, Path(folder) / name)
    return name, annotations


def _is_current(path: Path, config: SyntheticConfig, folder: Path) -> bool:
    """Whether ``path`` holds this exact config's split and all its images exist."""
    try:
        data = json.loads(path.read_text())
        info = data["info"]
        return (info["config"] == asdict(config)
                and info["generator_version"] == GENERATOR_VERSION
                and all((folder / im["file_name"]).is_file() for im in data["images"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def generate_synthetic_coco(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(), *,
                            num_workers: int = 1, progress: bool = False) -> dict[str, Path]:
    """Write the train, val and support splits under ``out_dir`` (layout in the module doc).

    A split whose annotation JSON was written by this generator version with the same config,
    and whose images are all present, is kept as it is.

    Args:
        out_dir: dataset root; created if needed.
        config: what to generate.
        num_workers: processes drawing images; the output does not depend on it.
        progress: show a tqdm bar per split.

    Returns:
        {"train": path, "val": path, "support": path} of the COCO annotation JSON files.
    """
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = category_table(config.num_categories)
    first_novel = config.num_categories - config.num_novel
    coco_categories = [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"],
                        "novel": k >= first_novel} for k, c in enumerate(categories)]
    counts = {"train": config.num_train, "val": config.num_val, "support": config.num_support,
              "test": config.num_test}
    paths, pool = {}, None
    try:
        for split in [s for s in SPLITS if s != "test" or config.num_test]:
            paths[split] = path = out / "annotations" / f"instances_{split}.json"
            folder = out / "images" / split
            if _is_current(path, config, folder):
                if split == "train" and config.long_tail > 0:
                    coco_categories = json.loads(path.read_text())["categories"]
                continue
            folder.mkdir(parents=True, exist_ok=True)
            tasks = [(config, split, i, categories, str(folder)) for i in range(counts[split])]
            if num_workers > 1 and len(tasks) > 1:
                pool = pool or ProcessPoolExecutor(num_workers)
                chunk = max(1, min(64, len(tasks) // (4 * num_workers)))
                results = pool.map(_render_and_write, tasks, chunksize=chunk)
            else:
                results = map(_render_and_write, tasks)
            images, annotations = [], []
            bar = tqdm(results, total=len(tasks), desc=f"synthetic {split}",
                       disable=not progress)
            for index, (name, anns) in enumerate(bar):
                images.append({"id": index + 1, "file_name": name,
                               "width": config.image_size, "height": config.image_size})
                for ann in anns:
                    annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
            if split == "train" and config.long_tail > 0:  # every split carries the labels
                labels = frequency_labels(annotations, config.num_train, config.rare_fraction)
                coco_categories = [c if c["novel"] else {**c, "frequency": labels.get(c["id"], "r")}
                                   for c in coco_categories]
            # images of an earlier, larger or differently formatted run would linger otherwise
            keep = {im["file_name"] for im in images}
            for stale in folder.iterdir():
                if _IMAGE_NAME.match(stale.name) and stale.name not in keep:
                    stale.unlink()
            payload = {
                "info": {"description": "dinor1 synthetic visual-prompt detection dataset",
                         "generator_version": GENERATOR_VERSION, "split": split,
                         "config": asdict(config)},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": coco_categories,
            }
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, path)
    finally:
        if pool is not None:
            pool.shutdown()
    return paths
