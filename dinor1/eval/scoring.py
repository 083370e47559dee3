"""Scoring detections with the field's own evaluators: COCO AP, LVIS federated AP, ODinW means.

Detections are COCO results dicts ``{"image_id", "category_id", "bbox": [x, y, w, h] (pixels),
"score"}``; ground truth is a COCO-format dict (``images``, ``annotations``, ``categories``) or the
path of one. The numbers come from pycocotools (the reference) or faster-coco-eval's
``COCOeval_faster`` (same numbers, C++ speed); this module only prepares their inputs and reads
their accumulated arrays:

* ``precision`` [T, R, K, A, M]: IoU thresholds x recall thresholds x categories x area ranges x
  max-detection limits; -1 where a category has no ground truth.
* ``recall`` [T, K, A, M].

Every headline metric is the mean of the valid (> -1) entries of one slice, exactly as
``COCOeval.summarize`` computes it; a mean over nothing (-1 there) is reported as 0.0. Seen/novel
and LVIS frequency groups are means over a subset of the K axis, which is what COCOeval gives
with ``params.catIds`` restricted to that subset (categories are evaluated independently).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinor1.errors import UserError

_AREA_LABELS = ("all", "small", "medium", "large")
_SUMMARY_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} {}] = {:0.3f}"


@dataclass
class ScoreResult:
    """What one evaluation produced (see the module docstring for the array layout)."""

    metrics: dict[str, float]
    per_category: list[dict]  # category_id, name, AP, AP50, num_gt, novel, frequency
    precision: np.ndarray | None  # [T, R, K, A, M] as accumulated by the evaluator
    category_ids: list[int]  # the K axis of ``precision``
    iou_thresholds: list[float]
    recall_thresholds: list[float]
    summary: str = ""  # the standard COCOeval summary text, one line per headline metric


def coco_ground_truth(images: list[dict], annotations: list[dict],
                      categories: list[dict]) -> dict:
    """Assemble a COCO ground-truth dict the evaluators accept (inputs are copied, not changed).

    Images need ``id``, ``width`` and ``height``; extra keys (LVIS ``neg_category_ids``,
    ``not_exhaustive_category_ids``) and extra category keys (``frequency``, ``novel``) are kept.
    Annotations get ``area`` = w * h and ``iscrowd`` = 0 when missing. Annotation ids are kept when
    they are unique positive integers, otherwise all are renumbered 1..N: pycocotools stores the
    matched GT id as the "matched" flag, so an id of 0 would count as unmatched.
    """
    out_images = []
    for index, image in enumerate(images):
        missing = [k for k in ("id", "width", "height") if k not in image]
        if missing:
            raise UserError(f"ground truth image #{index} has no {', '.join(missing)}")
        out_images.append(dict(image))
    out_annotations = []
    for ann in annotations:
        ann = dict(ann)
        ann["bbox"] = [float(v) for v in ann["bbox"]]
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
        out_annotations.append(ann)
    ids = [a.get("id") for a in out_annotations]
    if not all(isinstance(i, int) and i > 0 for i in ids) or len(set(ids)) != len(ids):
        for number, ann in enumerate(out_annotations, 1):
            ann["id"] = number
    return {"images": out_images, "annotations": out_annotations,
            "categories": [dict(c) for c in categories]}


def _load_json(source: dict | list | str | Path) -> dict | list:
    if isinstance(source, (str, Path)):
        return json.loads(Path(source).read_text())
    return source


def _prepare(gt, detections) -> tuple[dict, list[dict], int]:
    """(normalised GT copy, detections on known images as fresh dicts, number dropped)."""
    raw = _load_json(gt)
    gt = coco_ground_truth(raw["images"], raw.get("annotations", []), raw["categories"])
    known = {im["id"] for im in gt["images"]}
    kept = [{"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
             "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])}
            for d in _load_json(detections)]
    on_known = [d for d in kept if d["image_id"] in known]
    return gt, on_known, len(kept) - len(on_known)


def _evaluator(backend: str, gt: dict, detections: list[dict], max_dets: list[int], *,
               lvis: bool = False):
    """Run evaluate() + accumulate() silently; returns the evaluator (``.eval``, ``.params``)."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Evaluator
        options = {}
    elif backend == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Evaluator
        options = {"print_function": lambda *args, **kwargs: None, "lvis_style": lvis}
    else:
        raise UserError(f"unknown scoring backend {backend!r} (pycocotools, faster_coco_eval)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # loadRes([]) fails in pycocotools; an empty result set is still scorable
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = Evaluator(coco_gt, coco_dt, "bbox", **options)
        evaluator.params.maxDets = max_dets
        if lvis:
            # faster-coco-eval groups categories by "frequency" while preparing, and fails on a
            # category without one; those groups only feed its own summarize(), which we don't
            # use (APr/APc/APf are computed in score_lvis), so an extra label keeps it working.
            evaluator.params.imgCountLbl = ["r", "c", "f", ""]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1, or -1 when there are none (COCOeval's convention)."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


class _Slicer:
    """The summarize() slices of an accumulated evaluation."""

    def __init__(self, evaluator):
        params = evaluator.params
        self.precision = np.asarray(evaluator.eval["precision"])
        self.recall = np.asarray(evaluator.eval["recall"])
        self.iou_thresholds = [float(t) for t in params.iouThrs]
        self.max_dets = list(params.maxDets)
        self.area_labels = list(params.areaRngLbl)

    def _iou_index(self, iou: float | None) -> slice | list[int]:
        if iou is None:
            return slice(None)
        return [i for i, t in enumerate(self.iou_thresholds) if np.isclose(t, iou)]

    def ap(self, *, iou: float | None = None, area: str = "all", max_dets: int | None = None,
           cats: Sequence[int] | None = None) -> float:
        m = self.max_dets.index(max_dets or self.max_dets[-1])
        s = self.precision[self._iou_index(iou)][:, :, :, self.area_labels.index(area), m]
        return _mean_valid(s if cats is None else s[:, :, list(cats)])

    def ar(self, *, iou: float | None = None, area: str = "all",
           max_dets: int | None = None) -> float:
        m = self.max_dets.index(max_dets or self.max_dets[-1])
        return _mean_valid(self.recall[self._iou_index(iou)][:, :, self.area_labels.index(area), m])


def _summary_line(value: float, *, ap: bool, iou: float | None, area: str, max_dets: int,
                  cats: str = "") -> str:
    title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
    iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
    return _SUMMARY_LINE.format(title, kind, iou_text, area, max_dets,
                                f"catIds={cats:>3s}" if cats else "", value)


def _headline(slicer: _Slicer, *, lvis_groups: dict[str, list[int]] | None = None
              ) -> tuple[dict[str, float], list[str]]:
    """Headline metrics (raw COCOeval means, -1 kept) and the summary lines, in summarize order."""
    top = slicer.max_dets[-1]
    rows: list[tuple[str, float, dict]] = [
        ("AP", slicer.ap(), {"ap": True, "iou": None, "area": "all"}),
        ("AP50", slicer.ap(iou=0.5), {"ap": True, "iou": 0.5, "area": "all"}),
        ("AP75", slicer.ap(iou=0.75), {"ap": True, "iou": 0.75, "area": "all"}),
    ]
    for short, area in (("s", "small"), ("m", "medium"), ("l", "large")):
        rows.append((f"AP{short}", slicer.ap(area=area), {"ap": True, "iou": None, "area": area}))
    for label, cats in (lvis_groups or {}).items():
        rows.append((f"AP{label}", slicer.ap(cats=cats),
                     {"ap": True, "iou": None, "area": "all", "cats": label}))
    for m in slicer.max_dets:
        rows.append((f"AR{m}", slicer.ar(max_dets=m),
                     {"ap": False, "iou": None, "area": "all", "max_dets": m}))
    for short, area in (("s", "small"), ("m", "medium"), ("l", "large")):
        rows.append((f"AR{short}", slicer.ar(area=area), {"ap": False, "iou": None, "area": area}))
    metrics = {name: value for name, value, _ in rows}
    lines = [_summary_line(value, **{"max_dets": top, **fmt}) for _, value, fmt in rows]
    return metrics, lines


def _per_category(slicer: _Slicer, gt: dict, category_ids: list[int],
                  novel: set[int] | None) -> list[dict]:
    counts: dict[int, int] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    by_id = {c["id"]: c for c in gt["categories"]}
    rows = []
    for k, cid in enumerate(category_ids):
        category = by_id[cid]
        ap, ap50 = slicer.ap(cats=[k]), slicer.ap(iou=0.5, cats=[k])
        flag = (cid in novel) if novel is not None else category.get("novel")
        rows.append({"category_id": cid, "name": str(category.get("name", cid)),
                     "AP": ap if ap > -1 else float("nan"),
                     "AP50": ap50 if ap50 > -1 else float("nan"),
                     "num_gt": counts.get(cid, 0),
                     "novel": None if flag is None else bool(flag),
                     "frequency": category.get("frequency")})
    return rows


def _result(evaluator, slicer: _Slicer, gt: dict, metrics: dict[str, float], lines: list[str],
            novel: set[int] | None) -> ScoreResult:
    category_ids = [int(c) for c in evaluator.params.catIds]
    return ScoreResult(
        metrics=metrics,
        per_category=_per_category(slicer, gt, category_ids, novel),
        precision=slicer.precision,
        category_ids=category_ids,
        iou_thresholds=slicer.iou_thresholds,
        recall_thresholds=[float(r) for r in evaluator.params.recThrs],
        summary="\n".join(lines))


def _zero_absent(metrics: dict[str, float]) -> dict[str, float]:
    """COCOeval's -1 ("nothing to average") becomes 0.0 so logged curves stay on the AP scale."""
    return {k: (0.0 if v == -1 else float(v)) for k, v in metrics.items()}


def score_coco(gt: dict | str | Path, detections: list[dict] | str | Path, *,
               novel_category_ids: Iterable[int] = (), backend: str = "pycocotools",
               max_dets: int = 100) -> ScoreResult:
    """COCO box AP of ``detections`` against ``gt``.

    Metrics: the 12 standard stats ``AP AP50 AP75 APs APm APl AR1 AR10 AR<max_dets> ARs ARm ARl``,
    ``dropped_detections`` (detections on images absent from ``gt``, left out because the
    evaluators reject them) and, when ``novel_category_ids`` is given, ``seen/AP seen/AP50
    novel/AP novel/AP50`` over the two groups of categories.

    Args:
        backend: ``"pycocotools"`` (the reference) or ``"faster_coco_eval"``.
        max_dets: most detections per image and category (COCO's 100).
    """
    gt, detections, dropped = _prepare(gt, detections)
    evaluator = _evaluator(backend, gt, detections, sorted({1, 10, max_dets}))
    slicer = _Slicer(evaluator)
    metrics, lines = _headline(slicer)
    novel = {int(c) for c in novel_category_ids}
    if novel:
        category_ids = [int(c) for c in evaluator.params.catIds]
        for group, members in (("seen", [k for k, c in enumerate(category_ids) if c not in novel]),
                               ("novel", [k for k, c in enumerate(category_ids) if c in novel])):
            metrics[f"{group}/AP"] = slicer.ap(cats=members) if members else -1.0
            metrics[f"{group}/AP50"] = slicer.ap(iou=0.5, cats=members) if members else -1.0
    metrics.update(_frequency_groups(slicer, gt, [int(c) for c in evaluator.params.catIds]))
    metrics = _zero_absent(metrics)
    metrics["dropped_detections"] = float(dropped)
    return _result(evaluator, slicer, gt, metrics, lines, novel or None)


def _frequency_groups(slicer: _Slicer, gt: dict, category_ids: list[int]) -> dict[str, float]:
    """APr, APc, APf (and AP50 of each) over the categories whose ``frequency`` label is r, c
    or f, for a dataset that labels them (the long-tailed synthetic one); {} otherwise."""
    frequency = {c["id"]: c.get("frequency") for c in gt["categories"]}
    if not any(frequency.get(c) in ("r", "c", "f") for c in category_ids):
        return {}
    metrics = {}
    for label in ("r", "c", "f"):
        members = [k for k, c in enumerate(category_ids) if frequency.get(c) == label]
        metrics[f"AP{label}"] = slicer.ap(cats=members) if members else -1.0
        metrics[f"AP{label}50"] = slicer.ap(iou=0.5, cats=members) if members else -1.0
    return metrics


def _top_per_image(detections: list[dict], limit: int) -> list[dict]:
    """The ``limit`` best-scoring detections of each image, over all categories (LVIS's cap)."""
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    kept = []
    for per_image in by_image.values():
        per_image.sort(key=lambda d: -d["score"])
        kept.extend(per_image[:limit])
    return kept


def score_lvis(gt: dict | str | Path, detections: list[dict] | str | Path, *,
               max_dets: int = 300) -> ScoreResult:
    """LVIS federated box AP through faster-coco-eval's ``lvis_style`` mode.

    The federated rules, per image: a detection of a category in ``neg_category_ids`` with no
    match is a false positive; a detection of a category neither annotated in the image nor in
    ``neg_category_ids`` is ignored; for a category in ``not_exhaustive_category_ids`` unmatched
    detections are not false positives. faster-coco-eval implements all three (its ``_prepare``
    drops the unverified detections and marks the not-exhaustive ones, which its C++ matcher then
    ignores when unmatched). What it does not do is LVIS's cap of ``max_dets`` detections per
    image over all categories (its ``maxDets`` caps each image *and category*), so the cap is
    applied here before the detections are passed in.

    Metrics: ``AP AP50 AP75 APs APm APl APr APc APf AR<max_dets> ARs ARm ARl`` (r/c/f from each
    category's ``frequency``) and ``dropped_detections``.
    """
    gt, detections, dropped = _prepare(gt, detections)
    detections = _top_per_image(detections, max_dets)
    evaluator = _evaluator("faster_coco_eval", _with_frequency(gt), detections, [max_dets],
                           lvis=True)
    slicer = _Slicer(evaluator)
    frequency = {c["id"]: c.get("frequency") for c in gt["categories"]}
    category_ids = [int(c) for c in evaluator.params.catIds]
    groups = {label: [k for k, c in enumerate(category_ids) if frequency[c] == label]
              for label in ("r", "c", "f")}
    metrics, lines = _headline(slicer, lvis_groups=groups)
    metrics = _zero_absent(metrics)
    metrics["dropped_detections"] = float(dropped)
    return _result(evaluator, slicer, gt, metrics, lines, None)


def _with_frequency(gt: dict) -> dict:
    """``gt`` with every category given a frequency label faster-coco-eval's LVIS mode accepts."""
    categories = [c if c.get("frequency") in ("r", "c", "f") else {**c, "frequency": ""}
                  for c in gt["categories"]]
    return {**gt, "categories": categories}


# ODinW benchmark lists, as named in the GLIP paper's ODinW-13 / ODinW-35 tables and the dataset
# folders of its download script (the same splits Grounding DINO reports). An entry with a "/"
# names one variant of a dataset that ships several; a bare name takes the first variant in
# sorted order (for ODinW-13 that is AerialMaritimeDrone/large and EgoHands/generic, as in GLIP).
ODINW13: tuple[str, ...] = (
    "AerialMaritimeDrone", "Aquarium", "CottontailRabbits", "EgoHands", "NorthAmericaMushrooms",
    "Packages", "PascalVOC", "pistols", "pothole", "Raccoon", "ShellfishOpenImages",
    "thermalDogsAndPeople", "VehiclesOpenImages",
)
ODINW35: tuple[str, ...] = (
    "AerialMaritimeDrone/large", "AerialMaritimeDrone/tiled", "AmericanSignLanguageLetters",
    "Aquarium", "BCCD", "boggleBoards", "brackishUnderwater", "ChessPieces", "CottontailRabbits",
    "dice", "DroneControl", "EgoHands/generic", "EgoHands/specific", "HardHatWorkers",
    "MaskWearing", "MountainDewCommercial", "NorthAmericaMushrooms", "openPoetryVision",
    "OxfordPets/by-breed", "OxfordPets/by-species", "PKLot", "Packages", "PascalVOC", "pistols",
    "plantdoc", "pothole", "Raccoon", "selfdrivingCar", "ShellfishOpenImages", "ThermalCheetah",
    "thermalDogsAndPeople", "UnoCards", "VehiclesOpenImages", "WildfireSmoke",
    "websiteScreenshots",
)


def _path_parts(key: str) -> list[str]:
    parts = [p.lower() for p in key.replace("\\", "/").split("/") if p]
    return parts[1:] if parts and parts[0] == "odinw" else parts


def odinw_summary(per_dataset_ap: dict[str, float]) -> dict[str, float]:
    """Mean AP over the ODinW-13 and ODinW-35 datasets found in ``per_dataset_ap``.

    Keys are dataset paths such as ``"AerialMaritimeDrone/large"`` or
    ``"odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco"``; a list entry matches the leading
    path components (after an optional ``odinw/``), case-insensitively, and of several matching
    variants the first in sorted order counts. Returns ``odinw13/mAP``, ``odinw13/found``,
    ``odinw35/mAP``, ``odinw35/found``; a list with no dataset found is left out.
    """
    keys = sorted(per_dataset_ap, key=_path_parts)  # variants in order, prefix or not
    summary: dict[str, float] = {}
    for label, names in (("odinw13", ODINW13), ("odinw35", ODINW35)):
        values = []
        for name in names:
            wanted = _path_parts(name)
            match = next((k for k in keys if _path_parts(k)[: len(wanted)] == wanted), None)
            if match is not None:
                values.append(float(per_dataset_ap[match]))
        if values:
            summary[f"{label}/mAP"] = float(np.mean(values))
            summary[f"{label}/found"] = float(len(values))
    return summary
