"""A synthetic visual-prompt detection dataset, written as a real COCO dataset on disk.

Scenes are cluttered images of coloured shapes. A category is a (shape, colour) pair ("red
star"); everything else varies as nuisance: size, rotation, aspect, colour jitter, texture
(solid, stripes, checker, dots), a noisy gradient background, unlabelled distractors (grey and
brown shapes, lines) and partial occlusion between objects. The last ``num_novel`` categories
never appear in the train split, so open-set prompting can be measured on val.

Splits: ``train`` (seen categories only), ``val`` (all categories) and ``support`` (all
categories, image ``i`` always contains category ``i % num_categories``; the source of "generic"
visual prompts). Every image is drawn from its own random generator seeded by
(seed, split, index), so the output is identical for any number of workers.

Layout::

    out_dir/images/{train,val,support}/000000000001.png
    out_dir/annotations/instances_{train,val,support}.json

Knobs (:class:`SyntheticConfig`): image size, images per split, categories (seen + novel),
objects per image, object scale, allowed overlap, distractors, image format.
"""

from __future__ import annotations

import json
import math
import os
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
DISTRACTOR_COLOURS = ((128, 128, 128), (95, 95, 95), (175, 175, 175), (120, 80, 45))
SPLITS = ("train", "val", "support")
MIN_VISIBLE = 0.3  # an object must keep this fraction of its pixels visible under occluders


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    image_size: int = 128
    num_train: int = 2000
    num_val: int = 200
    num_support: int = 100
    num_categories: int = 8
    num_novel: int = 2
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.12
    max_scale: float = 0.4
    max_overlap_iou: float = 0.4
    num_distractors: int = 2
    image_format: str = "png"

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)!r} {why}")

        if self.image_size < 32:
            bad("image_size", "must be >= 32")
        for name in ("num_train", "num_val", "num_support"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not 1 <= self.num_categories <= len(SHAPES) * len(COLOURS):
            bad("num_categories", f"must be in 1..{len(SHAPES) * len(COLOURS)}")
        if not 0 <= self.num_novel < self.num_categories:
            bad("num_novel", f"must be >= 0 and < num_categories={self.num_categories}")
        if not 1 <= self.min_objects <= self.max_objects:
            bad("min_objects", f"must be >= 1 and <= max_objects={self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 0.9:
            bad("min_scale", f"must satisfy 0 < min_scale <= max_scale={self.max_scale} <= 0.9")
        if not 0 <= self.max_overlap_iou <= 1:
            bad("max_overlap_iou", "must be in [0, 1]")
        if self.num_distractors < 0:
            bad("num_distractors", "must be >= 0")
        if self.image_format not in ("png", "jpg"):
            bad("image_format", "must be 'png' or 'jpg'")


def category_table(num_categories: int) -> list[dict]:
    """COCO category dicts (ids from 1). Category k uses shape k % 12 and colour
    (k + 5 * (k // 12)) % 8, so neighbouring categories differ in shape and colour and all
    96 pairs are reachable."""
    colours = list(COLOURS)
    table = []
    for k in range(num_categories):
        shape = SHAPES[k % len(SHAPES)]
        colour = colours[(k + 5 * (k // len(SHAPES))) % len(colours)]
        table.append({"id": k + 1, "name": f"{colour} {shape}", "supercategory": shape,
                      "shape": shape, "colour": colour})
    return table


def _polygon(shape: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Unit-radius outline of a polygonal shape, centred at 0."""
    if shape in ("square", "diamond", "triangle", "pentagon", "hexagon"):
        n = {"square": 4, "diamond": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[shape]
        offset = math.pi / 4 if shape == "square" else -math.pi / 2
        pts = [(math.cos(offset + 2 * math.pi * i / n), math.sin(offset + 2 * math.pi * i / n))
               for i in range(n)]
        return [(x, y * 1.6) if shape == "diamond" else (x, y) for x, y in pts]
    if shape == "star":
        return [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + math.pi * i / 5),
                 (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + math.pi * i / 5))
                for i in range(10)]
    if shape == "cross":
        a = 0.33
        return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                (-1, a), (-1, -a), (-a, -a)]
    if shape == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3 / 16
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 16
        return list(zip(xs.tolist(), (ys + 0.2).tolist()))
    raise ValueError(shape)


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float,
                aspect: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [size, size] mask of one shape."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    rx, ry = radius * aspect, radius / aspect
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        if shape == "ring":
            draw.ellipse([cx - rx * 0.55, cy - ry * 0.55, cx + rx * 0.55, cy + ry * 0.55], fill=0)
        elif shape == "crescent":
            dx, dy = 0.55 * rx * math.cos(angle), 0.55 * ry * math.sin(angle)
            draw.ellipse([cx + dx - rx * 0.85, cy + dy - ry * 0.85, cx + dx + rx * 0.85,
                          cy + dy + ry * 0.85], fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        pts = [(cx + (x * rx) * cos - (y * ry) * sin, cy + (x * rx) * sin + (y * ry) * cos)
               for x, y in _polygon(shape, rng)]
        draw.polygon(pts, fill=255)
    return np.asarray(mask) > 127


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] brightness factors: solid, stripes, checker or dots."""
    kind = rng.integers(4)
    if kind == 0:
        return np.ones((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.uniform(3, 7))
    shade = float(rng.choice([0.65, 1.3]))
    if kind == 1:
        theta = float(rng.uniform(0, math.pi))
        on = ((xx * math.cos(theta) + yy * math.sin(theta)) / period) % 2 < 1
    elif kind == 2:
        on = ((xx // period + yy // period) % 2) == 0
    else:
        on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.5) ** 2
    return np.where(on, shade, 1.0).astype(np.float32)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour, rng: np.random.Generator) -> None:
    jitter = rng.uniform(0.85, 1.1) * np.asarray(colour, np.float32) + rng.uniform(-15, 15, 3)
    texture = _texture(canvas.shape[0], rng)[mask]
    canvas[mask] = np.clip(texture[:, None] * jitter[None, :], 0, 255)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.uniform(70, 190, 3), rng.uniform(70, 190, 3)
    grey = (a + b) / 2  # desaturate so no background looks like a category colour
    a, b = 0.35 * a + 0.65 * grey.mean(), 0.35 * b + 0.65 * grey.mean()
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta), 0, 1)
    img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    return np.clip(img + rng.normal(0, 7, img.shape), 0, 255).astype(np.float32)


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_scene(config: SyntheticConfig, split: str, index: int, categories: list[dict]
                 ) -> tuple[np.ndarray, list[dict]]:
    """Draw one image; returns (uint8 [S, S, 3], annotations without ids)."""
    size = config.image_size
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    allowed = categories
    if split == "train":
        allowed = categories[: len(categories) - config.num_novel]
    canvas = _background(size, rng)
    for _ in range(int(rng.integers(0, config.num_distractors + 1))):
        if rng.random() < 0.5:
            draw = Image.new("L", (size, size), 0)
            x0, y0, x1, y1 = rng.uniform(0, size, 4)
            ImageDraw.Draw(draw).line([x0, y0, x1, y1], fill=255, width=int(rng.integers(1, 3)))
            mask = np.asarray(draw) > 127
        else:
            radius = rng.uniform(0.05, 0.3) * size / 2
            mask = _shape_mask(str(rng.choice(SHAPES)), size, *rng.uniform(0, size, 2), radius,
                               rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25), rng)
        colour = DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))]
        _paint(canvas, mask, colour, rng)

    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    chosen = [allowed[int(rng.integers(len(allowed)))] for _ in range(wanted)]
    if split == "support":
        chosen[0] = categories[index % len(categories)]
    index_map = np.full((size, size), -1, np.int32)
    objects: list[tuple[dict, np.ndarray, tuple]] = []
    for category in chosen:
        for _attempt in range(20):
            radius = rng.uniform(config.min_scale, config.max_scale) * size / 2
            cx, cy = rng.uniform(radius, size - radius, 2)
            aspect, angle = rng.uniform(0.8, 1.25), rng.uniform(0, 2 * math.pi)
            mask = _shape_mask(category["shape"], size, cx, cy, radius, angle, aspect, rng)
            ys, xs = np.nonzero(mask)
            if len(xs) < 16:
                continue
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if any(_box_iou(box, other[2]) > config.max_overlap_iou for other in objects):
                continue
            trial = index_map.copy()
            trial[mask] = len(objects)
            if all((trial == j).sum() >= MIN_VISIBLE * m.sum() for j, (_, m, _) in
                   enumerate(objects)):
                index_map = trial
                objects.append((category, mask, box))
                _paint(canvas, mask, COLOURS[category["colour"]], rng)
                break
    annotations = []
    for j, (category, _mask, _box) in enumerate(objects):
        ys, xs = np.nonzero(index_map == j)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append({"category_id": category["id"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float(len(xs)), "iscrowd": 0})
    return canvas.astype(np.uint8), annotations


def _render_and_write(args) -> tuple[str, list[dict]]:
    config, split, index, categories, folder = args
    image, annotations = render_scene(config, split, index, categories)
    name = f"{index + 1:012d}.{config.image_format}"
    tmp = Path(folder) / f".{name}.tmp-{os.getpid()}"
    Image.fromarray(image).save(tmp, format="PNG" if config.image_format == "png" else "JPEG",
                                **({"quality": 90} if config.image_format == "jpg" else {}))
    os.replace(tmp, Path(folder) / name)
    return name, annotations


def generate_synthetic_coco(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(), *,
                            num_workers: int = 1, progress: bool = False) -> dict[str, Path]:
    """Write the three splits under ``out_dir``; returns {split: annotation JSON path}.

    An existing dataset generated with the same config is reused as it is.
    """
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = category_table(config.num_categories)
    novel = {c["id"] for c in categories[len(categories) - config.num_novel:]}
    coco_categories = [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"],
                        "novel": c["id"] in novel} for c in categories]
    counts = {"train": config.num_train, "val": config.num_val, "support": config.num_support}
    paths = {}
    for split in SPLITS:
        path = out / "annotations" / f"instances_{split}.json"
        paths[split] = path
        if path.exists():
            try:
                if json.loads(path.read_text())["info"]["config"] == asdict(config):
                    continue
            except (ValueError, KeyError):
                pass
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        tasks = [(config, split, i, categories, str(folder)) for i in range(counts[split])]
        if num_workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(num_workers) as pool:
                results = list(tqdm(pool.map(_render_and_write, tasks, chunksize=16),
                                    total=len(tasks), desc=f"synthetic {split}",
                                    disable=not progress))
        else:
            results = [_render_and_write(t) for t in tqdm(tasks, desc=f"synthetic {split}",
                                                           disable=not progress)]
        images, annotations = [], []
        for index, (name, anns) in enumerate(results):
            images.append({"id": index + 1, "file_name": name, "width": config.image_size,
                           "height": config.image_size})
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
        payload = {
            "info": {"description": "dinor1 synthetic visual-prompt detection dataset",
                     "split": split, "config": asdict(config)},
            "images": images, "annotations": annotations, "categories": coco_categories,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)
    return paths
