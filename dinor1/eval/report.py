"""Evaluation artifacts: per-category tables, precision/recall curves and drawn predictions.

Everything here reads a :class:`~dinor1.eval.scoring.ScoreResult` or COCO-style dicts and writes
files a person opens (Markdown, CSV, PNG); nothing feeds back into the metrics.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinor1.eval.scoring import ScoreResult

_GT_COLOUR = (40, 200, 70)
_DET_COLOUR = (230, 30, 40)
_CSV_FIELDS = ("category_id", "name", "novel", "frequency", "num_gt", "AP", "AP50")


def _group(row: dict) -> str:
    """"novel"/"seen", the LVIS frequency, both, or "-" when neither is known."""
    parts = []
    if row.get("novel") is not None:
        parts.append("novel" if row["novel"] else "seen")
    if row.get("frequency"):
        parts.append(str(row["frequency"]))
    return ", ".join(parts) or "-"


def _number(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def per_category_markdown(result: ScoreResult) -> str:
    """A Markdown table (id, name, seen/novel or frequency, num_gt, AP, AP50), sorted by id."""
    lines = ["| id | name | group | num_gt | AP | AP50 |", "|---:|---|---|---:|---:|---:|"]
    for row in sorted(result.per_category, key=lambda r: r["category_id"]):
        name = str(row["name"]).replace("|", "\\|")
        lines.append(f"| {row['category_id']} | {name} | {_group(row)} | {row['num_gt']} | "
                     f"{_number(row['AP'])} | {_number(row['AP50'])} |")
    return "\n".join(lines) + "\n"


def write_per_category_csv(result: ScoreResult, path: str | Path) -> Path:
    """One CSV row per category (``category_id name novel frequency num_gt AP AP50``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(result.per_category, key=lambda r: r["category_id"]):
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in _CSV_FIELDS})
    return path


def plot_pr_curves(result: ScoreResult, path: str | Path, *, iou: float = 0.5,
                   max_classes: int = 20, title: str = "") -> Path:
    """Precision/recall at IoU ``iou`` (all areas, the largest max-detections limit).

    One thin curve per category (the ``max_classes`` with the most ground truth; novel ones
    dashed when known) and their mean over every category with ground truth in bold. Without
    precision data the PNG says so instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    try:
        curves = _pr_curves(result, iou)
        if not curves:
            ax.text(0.5, 0.5, "no precision data", ha="center", va="center", fontsize=14)
            ax.set_axis_off()
        else:
            recall = np.asarray(result.recall_thresholds)
            rows = {r["category_id"]: r for r in result.per_category}
            shown = sorted(curves, key=lambda c: -rows.get(c, {}).get("num_gt", 0))[:max_classes]
            for cid in shown:
                row = rows.get(cid, {})
                ax.plot(recall, curves[cid], linewidth=1, alpha=0.7,
                        linestyle="--" if row.get("novel") else "-",
                        label=str(row.get("name", cid)))
            ax.plot(recall, np.mean(list(curves.values()), axis=0), color="black", linewidth=3,
                    label="mean")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2, loc="lower left")
        ax.set_title(title or f"precision / recall at IoU {iou:.2f}")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _pr_curves(result: ScoreResult, iou: float) -> dict[int, np.ndarray]:
    """category id -> [R] precision at the IoU threshold nearest ``iou``, for evaluated ones."""
    if result.precision is None or result.precision.size == 0 or not result.iou_thresholds:
        return {}
    t = int(np.argmin(np.abs(np.asarray(result.iou_thresholds) - iou)))
    curves = {}
    for k, cid in enumerate(result.category_ids):
        curve = result.precision[t, :, k, 0, -1]
        if (curve > -1).all():
            curves[cid] = curve
    return curves


def draw_detections(image: np.ndarray, detections: list[dict], names: dict[int, str], *,
                    ground_truth: list[dict] | None = None,
                    score_threshold: float = 0.3) -> Image.Image:
    """Boxes drawn on a copy of ``image`` [H, W, 3] uint8.

    Ground truth (COCO annotations, ``bbox`` x, y, w, h) in green; detections (COCO results in
    the same pixel coordinates) with ``score >= score_threshold`` in red, labelled "name score".
    """
    canvas = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    for ann in ground_truth or []:
        x, y, w, h = ann["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=_GT_COLOUR, width=width)
    kept = [d for d in detections if d["score"] >= score_threshold]
    for det in sorted(kept, key=lambda d: d["score"]):  # best drawn last, on top
        x, y, w, h = det["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=_DET_COLOUR, width=width)
        label = f"{names.get(det['category_id'], det['category_id'])} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label)
        text_y = y - (bottom - top) - 4 if y - (bottom - top) - 4 >= 0 else y
        draw.rectangle([x, text_y, x + (right - left) + 4, text_y + (bottom - top) + 4],
                       fill=_DET_COLOUR)
        draw.text((x + 2, text_y + 2 - top), label, fill=(255, 255, 255))
    return canvas


def _scaled(items: list[dict], scale: float) -> list[dict]:
    return [{**d, "bbox": [v * scale for v in d["bbox"]]} for d in items]


def prediction_grid(items: list[tuple[np.ndarray, list[dict], list[dict]]],
                    names: dict[int, str], path: str | Path, *, tile: int = 256,
                    columns: int = 4, score_threshold: float = 0.3) -> Path:
    """A PNG grid of (image, detections, ground truth) drawings, each fitted into a square tile.

    The image is resized first and the boxes scaled with it, so labels stay legible. The grid is
    ``min(columns, len(items))`` tiles wide and as many rows high as needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = max(1, min(columns, len(items)))
    rows = max(1, math.ceil(len(items) / columns))
    grid = Image.new("RGB", (columns * tile, rows * tile), (30, 30, 30))
    for index, (image, detections, truth) in enumerate(items):
        height, width = image.shape[:2]
        scale = tile / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
            size, Image.Resampling.BILINEAR))
        drawn = draw_detections(small, _scaled(detections, scale), names,
                                ground_truth=_scaled(truth, scale),
                                score_threshold=score_threshold)
        row, col = divmod(index, columns)
        grid.paste(drawn, (col * tile + (tile - size[0]) // 2, row * tile + (tile - size[1]) // 2))
    grid.save(path)
    return path
