"""Detection loss: hand-worked focal/L1/GIoU values, padded prompts, gradients, normaliser."""

import math

import pytest
import torch
import torch.distributed as dist

from dinor1.objectives.detection import (
    detection_loss,
    num_boxes_across_workers,
    sigmoid_focal_loss,
)

INF = float("inf")
GT_LABELS = torch.tensor([[0]])
GT_BOXES = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
PROMPT_MASK = torch.tensor([[True, True, False]])  # prompt 2 is padding
MATCH = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 <-> GT 0
# the weights the hand-worked numbers use (the release's, the config defaults)
W = dict(class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)
FOCAL = dict(alpha=0.25, gamma=2.0)


def _inputs(box, logits=None):
    if logits is None:  # perfect classification: query 0 -> prompt 0, query 1 -> nothing
        logits = [[20.0, -20.0, -INF], [-20.0, -20.0, -INF]]
    logits = torch.tensor([logits], requires_grad=True)
    boxes = torch.tensor([[box, [0.2, 0.2, 0.1, 0.1]]], requires_grad=True)
    return logits, boxes


def _loss(logits, boxes, num_boxes=1.0, matches=MATCH):
    return detection_loss(logits, boxes, matches, GT_LABELS, GT_BOXES, PROMPT_MASK, num_boxes,
                          **W)


def test_perfect_prediction():
    out = _loss(*_inputs([0.5, 0.5, 0.2, 0.2]))
    assert set(out) == {"loss_class", "loss_bbox", "loss_giou"}
    assert all(v.dim() == 0 for v in out.values())
    assert out["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= out["loss_class"].item() < 1e-6


def test_values_by_hand():
    # all four valid logits 0 -> p = 0.5. Positive (q0, prompt 0): 0.25 * 0.5^2 * ln 2;
    # three negatives: 0.75 * 0.5^2 * ln 2 each. Sum = (0.0625 + 3 * 0.1875) ln 2 = 0.625 ln 2.
    logits, boxes = _inputs([0.6, 0.5, 0.2, 0.2], [[0.0, 0.0, -INF], [0.0, 0.0, -INF]])
    out = _loss(logits, boxes, num_boxes=2.0)
    assert out["loss_class"].item() == pytest.approx(0.625 * math.log(2) / 2, abs=1e-6)
    # box shifted 0.1 in x: L1 = 0.1 -> 5 * 0.1 / 2
    assert out["loss_bbox"].item() == pytest.approx(0.25, abs=1e-6)
    # xyxy [0.5,0.4,0.7,0.6] vs [0.4,0.4,0.6,0.6]: inter 0.02, union 0.06, hull 0.06 -> GIoU 1/3
    assert out["loss_giou"].item() == pytest.approx(2 * (1 - 1 / 3) / 2, abs=1e-6)


def test_weights_scale_terms():
    logits, boxes = _inputs([0.6, 0.5, 0.2, 0.2])
    base = _loss(logits, boxes)
    scaled = detection_loss(logits, boxes, MATCH, GT_LABELS, GT_BOXES, PROMPT_MASK, 1.0,
                            **{**W, "class_weight": 3.0, "bbox_weight": 1.0,
                               "giou_weight": 0.0})
    assert scaled["loss_class"].item() == pytest.approx(3 * base["loss_class"].item())
    assert scaled["loss_bbox"].item() == pytest.approx(base["loss_bbox"].item() / 5)
    assert scaled["loss_giou"].item() == 0.0


def test_loss_decreases_toward_target_and_gradients_finite():
    far = _loss(*_inputs([0.8, 0.6, 0.3, 0.1]))
    mid = _loss(*_inputs([0.65, 0.55, 0.25, 0.15]))
    near = _loss(*_inputs([0.52, 0.5, 0.21, 0.2]))
    for name in ("loss_bbox", "loss_giou"):
        assert far[name] > mid[name] > near[name]
    logits, boxes = _inputs([0.8, 0.6, 0.3, 0.1])
    sum(_loss(logits, boxes).values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert (logits.grad[..., 2] == 0).all()  # padded prompt gets no gradient
    assert boxes.grad[0, 1].abs().sum() == 0  # unmatched query's box is not supervised


def test_padded_prompt_logit_is_ignored():
    box = [0.6, 0.5, 0.2, 0.2]
    with_inf = _loss(*_inputs(box, [[1.0, -2.0, -INF], [0.5, 0.3, -INF]]))
    with_finite = _loss(*_inputs(box, [[1.0, -2.0, 7.0], [0.5, 0.3, -3.0]]))
    assert torch.isfinite(with_inf["loss_class"])
    assert with_inf["loss_class"].item() == pytest.approx(with_finite["loss_class"].item())


def test_focal_elementwise_and_inf_on_valid_prompt():
    logits = torch.tensor([[[1.0, -INF, -INF]]], requires_grad=True)
    targets = torch.tensor([[[0.0, 0.0, 1.0]]])
    loss = sigmoid_focal_loss(logits, targets, torch.tensor([[True, True, False]]), **FOCAL)
    # valid entry, target 0: (1 - alpha) p^2 (-log(1 - p)), p = sigmoid(1)
    p = 1 / (1 + math.exp(-1))
    assert loss[0, 0, 0].item() == pytest.approx(0.75 * p**2 * -math.log(1 - p), abs=1e-6)
    assert loss[0, 0, 1] == 0 and loss[0, 0, 2] == 0  # -inf on a valid prompt; padded prompt
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_no_matches_gives_zero_box_losses_with_grad():
    logits, boxes = _inputs([0.5, 0.5, 0.2, 0.2])
    empty = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))]
    out = _loss(logits, boxes, matches=empty)
    assert out["loss_bbox"].item() == 0.0 and out["loss_giou"].item() == 0.0
    assert out["loss_bbox"].requires_grad and out["loss_giou"].requires_grad
    # query 0 now a negative for prompt 0 with logit 20: large class loss
    assert out["loss_class"].item() > 1.0
    sum(out.values()).backward()
    assert torch.isfinite(boxes.grad).all()


def test_num_boxes_without_distributed():
    assert num_boxes_across_workers(torch.tensor([[True, False, True], [True, True, False]])) == 4.0
    assert num_boxes_across_workers(torch.zeros(2, 3, dtype=torch.bool)) == 1.0


def test_num_boxes_single_worker_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert num_boxes_across_workers(torch.tensor([[True, True], [True, False]])) == 3.0
        assert num_boxes_across_workers(torch.zeros(1, 2, dtype=torch.bool)) == 1.0
    finally:
        dist.destroy_process_group()


def test_focal_of_confident_positive_is_not_rounded_to_zero():
    # sigmoid(17) rounds to 1.0 in fp32, which zeroed the focal factor (1 - p_t)^2 of a loss
    # of ~1.8e-23
    loss = sigmoid_focal_loss(torch.tensor([[[17.0]]]), torch.tensor([[[1.0]]]),
                              torch.tensor([[True]]), **FOCAL)
    q = 1 / (1 + math.exp(17.0))  # 1 - p
    assert loss.item() == pytest.approx(0.25 * q**2 * math.log1p(q), rel=1e-5, abs=0)
