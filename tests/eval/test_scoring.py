"""Scoring against the reference evaluators, LVIS federated rules, ODinW means and report files."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from dinor1.eval.report import (
    draw_detections,
    per_category_markdown,
    plot_pr_curves,
    prediction_grid,
    write_per_category_csv,
)
from dinor1.eval.scoring import (
    ODINW13,
    ODINW35,
    ScoreResult,
    coco_ground_truth,
    odinw_summary,
    score_coco,
    score_lvis,
)

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
NAMES = {1: "cat", 2: "dog", 3: "boat", 4: "kite"}
NOVEL = (3, 4)


def _box(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A random box; sizes span COCO's small / medium / large areas."""
    side = float(rng.choice([20.0, 60.0, 150.0])) * rng.uniform(0.7, 1.3)
    w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
    return [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]


@pytest.fixture(scope="module")
def coco_gt() -> dict:
    rng = np.random.default_rng(7)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(1, 7)]
    annotations = [{"image_id": im["id"], "category_id": int(rng.integers(1, 5)),
                    "bbox": _box(rng, 640, 480)}
                   for im in images for _ in range(int(rng.integers(3, 7)))]
    categories = [{"id": c, "name": n} for c, n in NAMES.items()]
    return coco_ground_truth(images, annotations, categories)


def _oracle(gt: dict, score: float = 1.0) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": score} for a in gt["annotations"]]


def _jittered(gt: dict, seed: int = 3) -> list[dict]:
    """Noisy boxes, some wrong labels, some misses and some pure false positives."""
    rng = np.random.default_rng(seed)
    categories = [c["id"] for c in gt["categories"]]
    detections = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        noisy = [x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h),
                 w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)]
        label = ann["category_id"] if rng.random() > 0.15 else int(rng.choice(categories))
        detections.append({"image_id": ann["image_id"], "category_id": label, "bbox": noisy,
                           "score": float(rng.uniform(0.2, 1.0))})
    for image in gt["images"]:
        for _ in range(2):
            detections.append({"image_id": image["id"], "category_id": int(rng.choice(categories)),
                               "bbox": _box(rng, image["width"], image["height"]),
                               "score": float(rng.uniform(0.0, 0.9))})
    return detections


def _pycocotools_direct(gt_path, dt_path, cat_ids=None) -> tuple[np.ndarray, str]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(dt_path)), "bbox")
        if cat_ids is not None:
            evaluator.params.catIds = list(cat_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = "\n".join(line for line in out.getvalue().splitlines() if "Average" in line)
    return evaluator.stats, summary


# --- COCO ---------------------------------------------------------------------------------------

def test_oracle_scores_one(coco_gt):
    result = score_coco(coco_gt, _oracle(coco_gt), novel_category_ids=NOVEL)
    assert result.metrics["AP"] == pytest.approx(1.0)
    assert result.metrics["AP50"] == pytest.approx(1.0)
    assert result.metrics["seen/AP"] == pytest.approx(1.0)
    assert result.metrics["novel/AP"] == pytest.approx(1.0)
    assert result.metrics["dropped_detections"] == 0.0
    assert result.precision.shape == (10, 101, 4, 4, 3)
    assert result.category_ids == [1, 2, 3, 4]
    assert [r["novel"] for r in result.per_category] == [False, False, True, True]


def test_metrics_equal_direct_pycocotools(coco_gt, tmp_path):
    detections = _jittered(coco_gt)
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(coco_gt))
    dt_path.write_text(json.dumps(detections))
    result = score_coco(gt_path, dt_path, novel_category_ids=NOVEL)  # paths work as well as dicts

    stats, summary = _pycocotools_direct(gt_path, dt_path)
    assert 0.0 < result.metrics["AP"] < 1.0
    assert [result.metrics[k] for k in STATS] == pytest.approx(list(stats), abs=1e-12)
    assert result.summary == summary
    # seen/novel: the same numbers as a COCOeval run restricted to each group's catIds
    for group, cat_ids in (("seen", (1, 2)), ("novel", NOVEL)):
        restricted, _ = _pycocotools_direct(gt_path, dt_path, cat_ids)
        assert result.metrics[f"{group}/AP"] == pytest.approx(restricted[0], abs=1e-12)
        assert result.metrics[f"{group}/AP50"] == pytest.approx(restricted[1], abs=1e-12)
    assert result.metrics["seen/AP"] != pytest.approx(result.metrics["novel/AP"])
    by_id = {r["category_id"]: r for r in result.per_category}
    assert sum(r["num_gt"] for r in by_id.values()) == len(coco_gt["annotations"])
    assert np.mean([r["AP"] for r in by_id.values()]) == pytest.approx(result.metrics["AP"])


def test_faster_coco_eval_agrees_with_pycocotools(coco_gt):
    detections = _jittered(coco_gt)
    reference = score_coco(coco_gt, detections, novel_category_ids=NOVEL)
    faster = score_coco(coco_gt, detections, novel_category_ids=NOVEL, backend="faster_coco_eval")
    # The two accumulate the same matches in a different summation order (C++ vs numpy); the
    # differences seen are ~1e-16, so 1e-12 is tight while leaving room for float reordering.
    assert faster.metrics.keys() == reference.metrics.keys()
    for key, value in reference.metrics.items():
        assert abs(faster.metrics[key] - value) < 1e-12, key
    assert np.abs(faster.precision - reference.precision).max() < 1e-12
    assert faster.summary == reference.summary


def test_empty_unknown_images_and_categories(coco_gt):
    empty = score_coco(coco_gt, [], novel_category_ids=NOVEL)
    assert all(value == 0.0 for value in empty.metrics.values())
    assert set(STATS) <= empty.metrics.keys()
    assert empty.precision is not None

    gt = coco_ground_truth(coco_gt["images"], coco_gt["annotations"],
                           coco_gt["categories"] + [{"id": 9, "name": "no ground truth"}])
    stray = [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
             {"image_id": 1, "category_id": 77, "bbox": [0, 0, 10, 10], "score": 0.9},
             {"image_id": 1, "category_id": 9, "bbox": [0, 0, 10, 10], "score": 0.9}]
    for backend in ("pycocotools", "faster_coco_eval"):
        result = score_coco(gt, _oracle(gt) + stray, backend=backend)
        assert result.metrics["dropped_detections"] == 1.0
        assert result.metrics["AP"] == pytest.approx(1.0)
        no_gt = next(r for r in result.per_category if r["category_id"] == 9)
        assert no_gt["num_gt"] == 0 and math.isnan(no_gt["AP"])


def test_frequency_labelled_categories_add_rare_common_frequent_ap(coco_gt, tmp_path):
    """A COCO dataset whose categories carry LVIS frequency labels (the long-tailed synthetic
    one) gets APr/APc/APf: each the mean of its categories' AP, as pycocotools gives it with
    catIds restricted to the group; unlabelled datasets do not."""
    labels = {1: "r", 2: "c", 3: "f", 4: "f"}
    gt = {**coco_gt, "categories": [{**c, "frequency": labels[c["id"]]}
                                    for c in coco_gt["categories"]]}
    detections = _jittered(gt, seed=11)
    result = score_coco(gt, detections, novel_category_ids=NOVEL)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(detections))
    for label, cats in (("r", [1]), ("c", [2]), ("f", [3, 4])):
        stats, _ = _pycocotools_direct(tmp_path / "gt.json", tmp_path / "dt.json", cats)
        assert result.metrics[f"AP{label}"] == pytest.approx(stats[0], abs=1e-12)
        assert result.metrics[f"AP{label}50"] == pytest.approx(stats[1], abs=1e-12)
    assert "APr" not in score_coco(coco_gt, detections).metrics


def test_ground_truth_assembly_fills_coco_fields():
    images = [{"id": 5, "width": 10, "height": 10, "neg_category_ids": [2]}]
    annotations = [{"image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 3], "id": 0}]
    gt = coco_ground_truth(images, annotations, [{"id": 1, "name": "a", "frequency": "r"}])
    ann = gt["annotations"][0]
    assert (ann["id"], ann["area"], ann["iscrowd"]) == (1, 6.0, 0)
    assert gt["images"][0]["neg_category_ids"] == [2]
    assert gt["categories"][0]["frequency"] == "r"
    assert annotations[0]["id"] == 0  # the input is not changed


# --- LVIS ---------------------------------------------------------------------------------------

# image id -> (categories annotated, neg_category_ids, not_exhaustive_category_ids)
LVIS_IMAGES = {
    1: ([1, 4], [3], [4]),
    2: ([3, 4], [1], []),
    3: ([2, 5, 4], [1, 3], []),
    4: ([1, 5], [2], [5]),
    5: ([3, 2, 5], [4], []),
}
LVIS_FREQUENCY = {1: "r", 2: "r", 3: "c", 4: "f", 5: "f", 6: "r"}  # 6 has no ground truth
FAR_BOX = [150.0, 150.0, 30.0, 30.0]  # ground truth stays in the upper-left 120 x 120


@pytest.fixture(scope="module")
def lvis_gt() -> dict:
    rng = np.random.default_rng(11)
    images, annotations = [], []
    for image_id, (present, negative, not_exhaustive) in LVIS_IMAGES.items():
        images.append({"id": image_id, "width": 200, "height": 200,
                       "neg_category_ids": negative,
                       "not_exhaustive_category_ids": not_exhaustive})
        for category in present:
            for _ in range(2):
                w, h = rng.uniform(15, 50, 2)
                annotations.append({"image_id": image_id, "category_id": category,
                                    "bbox": [float(rng.uniform(0, 120 - w)),
                                             float(rng.uniform(0, 120 - h)), float(w), float(h)]})
    categories = [{"id": c, "name": f"class{c}", "frequency": f} for c, f in LVIS_FREQUENCY.items()]
    return coco_ground_truth(images, annotations, categories)


def _ap_of(result, category_id: int) -> float:
    return next(r["AP"] for r in result.per_category if r["category_id"] == category_id)


def _extra(image_id: int, category_id: int) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": FAR_BOX, "score": 0.9}


def test_lvis_negative_category_is_false_positive(lvis_gt):
    base = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5))
    assert base.metrics["AP"] == pytest.approx(1.0)
    changed = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5) + [_extra(1, 3)])  # 3 is negative on 1
    assert _ap_of(changed, 3) < _ap_of(base, 3)
    assert changed.metrics["AP"] < base.metrics["AP"]


def test_lvis_unverified_category_is_ignored(lvis_gt):
    base = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5))
    # category 2 is neither annotated on image 2 nor in its neg_category_ids
    changed = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5) + [_extra(2, 2)])
    assert changed.metrics == base.metrics
    assert changed.metrics["AP"] == pytest.approx(1.0)
    np.testing.assert_array_equal([r["AP"] for r in changed.per_category],  # nan == nan here
                                  [r["AP"] for r in base.per_category])


def test_lvis_not_exhaustive_category(lvis_gt):
    base = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5))
    on_not_exhaustive = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5) + [_extra(1, 4)])
    on_exhaustive = score_lvis(lvis_gt, _oracle(lvis_gt, 0.5) + [_extra(2, 4)])
    assert _ap_of(on_not_exhaustive, 4) == _ap_of(base, 4) == pytest.approx(1.0)
    assert _ap_of(on_exhaustive, 4) < _ap_of(base, 4)


def test_lvis_frequency_groups_are_category_means(lvis_gt):
    result = score_lvis(lvis_gt, _jittered(lvis_gt, seed=5))
    assert 0.0 < result.metrics["AP"] < 1.0
    for label in ("r", "c", "f"):
        aps = [r["AP"] for r in result.per_category
               if r["frequency"] == label and not math.isnan(r["AP"])]
        assert aps
        assert result.metrics[f"AP{label}"] == pytest.approx(float(np.mean(aps)), abs=1e-12)
    assert len({result.metrics[f"AP{label}"] for label in ("r", "c", "f")}) == 3
    assert math.isnan(_ap_of(result, 6))
    assert {"AP50", "AP75", "APs", "APm", "APl", "AR300"} <= result.metrics.keys()


def test_lvis_caps_detections_per_image_not_per_category(lvis_gt):
    # image 4 has two boxes each of categories 1 and 5; with room for 3 detections per image,
    # a better-scored false positive of 1 pushes the true detections of 5 out of the cap (a cap
    # per image and category, 3 each, would keep them all and leave AP of 5 at 1)
    detections = _oracle(lvis_gt, 0.5)
    for d in detections:
        if d["image_id"] == 4:
            d["score"] = 0.8 if d["category_id"] == 1 else 0.7
    result = score_lvis(lvis_gt, detections + [{**_extra(4, 1), "score": 0.95}], max_dets=3)
    assert _ap_of(result, 5) < 1.0
    roomy = score_lvis(lvis_gt, detections + [{**_extra(4, 1), "score": 0.95}], max_dets=7)
    assert _ap_of(roomy, 5) == pytest.approx(1.0)
    assert "AR3" in result.metrics


# --- ODinW --------------------------------------------------------------------------------------

def test_odinw_summary():
    assert len(ODINW13) == len(set(ODINW13)) == 13
    assert len(ODINW35) == len(set(ODINW35)) == 35
    per_dataset = {"AerialMaritimeDrone/tiled": 0.1, "odinw/AerialMaritimeDrone/large": 0.5,
                   "odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco": 0.3,
                   "egohands/specific": 0.4, "EgoHands/generic": 0.2, "NotOdinw/x": 0.9}
    summary = odinw_summary(per_dataset)
    assert summary["odinw13/found"] == 3
    assert summary["odinw13/mAP"] == pytest.approx((0.5 + 0.3 + 0.2) / 3)
    assert summary["odinw35/found"] == 5
    assert summary["odinw35/mAP"] == pytest.approx((0.1 + 0.5 + 0.3 + 0.4 + 0.2) / 5)
    only_35 = odinw_summary({"BCCD/BCCD.v3-raw.coco": 0.6})
    assert only_35 == {"odinw35/mAP": pytest.approx(0.6), "odinw35/found": 1}
    assert odinw_summary({"NotOdinw/x": 0.9}) == {}


# --- report -------------------------------------------------------------------------------------

def test_report_files(coco_gt, tmp_path):
    result = score_coco(coco_gt, _jittered(coco_gt), novel_category_ids=NOVEL)
    table = per_category_markdown(result)
    assert all(name in table for name in NAMES.values())
    assert "novel" in table and "seen" in table
    csv_path = write_per_category_csv(result, tmp_path / "per_category.csv")
    assert len(csv_path.read_text().strip().splitlines()) == 1 + len(NAMES)

    curves = plot_pr_curves(result, tmp_path / "pr.png", title="jittered")
    no_data = ScoreResult(metrics={}, per_category=[], precision=None, category_ids=[],
                          iou_thresholds=[], recall_thresholds=[])
    empty = plot_pr_curves(no_data, tmp_path / "none.png")
    for path in (curves, empty):
        assert path.stat().st_size > 0
        with Image.open(path) as img:
            assert img.format == "PNG"

    rng = np.random.default_rng(0)
    by_image: dict[int, list] = {}
    for d in _jittered(coco_gt):
        by_image.setdefault(d["image_id"], []).append(d)
    items = []
    for image in coco_gt["images"][:5]:
        pixels = rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8)
        truth = [a for a in coco_gt["annotations"] if a["image_id"] == image["id"]]
        items.append((pixels, by_image.get(image["id"], []), truth))
    grid = prediction_grid(items, NAMES, tmp_path / "grid.png", tile=64, columns=4)
    with Image.open(grid) as img:
        assert img.size == (4 * 64, 2 * 64)


def test_draw_detections_respects_threshold():
    image = np.zeros((100, 120, 3), np.uint8)
    det = {"image_id": 1, "category_id": 1, "bbox": [10, 20, 50, 40], "score": 0.5}
    gt = [{"image_id": 1, "category_id": 1, "bbox": [60, 50, 30, 30]}]
    shown = np.asarray(draw_detections(image, [det], NAMES, ground_truth=gt))
    hidden = np.asarray(draw_detections(image, [det], NAMES, ground_truth=gt,
                                        score_threshold=0.6))
    assert shown.shape == (100, 120, 3)
    red = (shown[..., 0] > 200) & (shown[..., 1] < 60)
    green = (hidden[..., 1] > 150) & (hidden[..., 0] < 100)
    assert red.any() and green.any()
    assert not ((hidden[..., 0] > 200) & (hidden[..., 1] < 60)).any()
