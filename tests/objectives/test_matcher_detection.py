"""Matcher and detection loss: hand-computed values and brute force."""

import itertools
import math

import pytest
import torch

from dinor1.objectives.detection import (
    detection_loss,
    num_boxes_across_workers,
    sigmoid_focal_loss,
)
from dinor1.objectives.matcher import generalized_box_iou, hungarian_match, matching_cost


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    same = generalized_box_iou(a, a)
    assert same.item() == pytest.approx(1.0)
    # disjoint: [0,0,1,1] vs [2,0,3,1]: IoU 0, hull 3x1 = 3, union 2 -> -(3-2)/3
    d = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 0, 3, 1]]))
    assert d.item() == pytest.approx(-1 / 3)
    # nested: [0,0,1,1] inside [0,0,2,2]: IoU 1/4, hull = union -> 1/4
    n = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), a)
    assert n.item() == pytest.approx(0.25)


def test_matching_cost_by_hand():
    # one image, one GT (prompt 0, box centre 0.5 size 0.2), two queries
    gt_labels, gt_boxes = torch.tensor([[0, -1]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2],
                                                                  [0.0, 0.0, 0.0, 0.0]]])
    logits = torch.tensor([[[0.0, 5.0], [math.log(3.0), 0.0]]])  # p(prompt 0) = 0.5, 0.75
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]])
    cost = matching_cost(logits, boxes, gt_labels, gt_boxes)
    assert cost.shape == (1, 2, 2) and torch.isfinite(cost).all()

    def focal(p):
        return 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)

    # query 0: perfect box -> L1 0, GIoU 1
    assert cost[0, 0, 0].item() == pytest.approx(2 * focal(0.5) + 0 - 2 * 1.0, abs=1e-5)
    # query 1: shifted by 0.1 in x: L1 0.1; boxes [0.5,0.4,0.7,0.6] vs [0.4,0.4,0.6,0.6]:
    # inter 0.1*0.2 = 0.02, union 0.06, hull 0.3*0.2 = 0.06 -> GIoU = 1/3
    assert cost[0, 1, 0].item() == pytest.approx(2 * focal(0.75) + 5 * 0.1 - 2 / 3, abs=1e-5)
    layered = matching_cost(torch.stack([logits, logits]), torch.stack([boxes, boxes]),
                            gt_labels, gt_boxes)
    assert layered.shape == (2, 1, 2, 2)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(2, 2, 4, 3, generator=g)
    gt_mask = torch.tensor([[True, True, True], [True, False, True]])
    matches = hungarian_match(cost, gt_mask)
    for layer in range(2):
        for b in range(2):
            gts = gt_mask[b].nonzero().flatten().tolist()
            best = min(sum(cost[layer, b, q, j].item() for q, j in zip(perm, gts))
                       for perm in itertools.permutations(range(4), len(gts)))
            q, j = matches[layer][b]
            assert sorted(j.tolist()) == gts
            got = sum(cost[layer, b, qi, ji].item() for qi, ji in zip(q.tolist(), j.tolist()))
            assert got == pytest.approx(best)


def _prediction(box):
    logits = torch.tensor([[[12.0, -12.0, float("-inf")], [-12.0, -12.0, float("-inf")]]])
    boxes = torch.tensor([[box, [0.2, 0.2, 0.1, 0.1]]], requires_grad=True)
    return logits.requires_grad_(True), boxes


def test_detection_loss_perfect_and_moving_toward_target():
    gt_labels, gt_boxes = torch.tensor([[0]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    prompt_mask = torch.tensor([[True, True, False]])
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    logits, boxes = _prediction([0.5, 0.5, 0.2, 0.2])
    perfect = detection_loss(logits, boxes, matches, gt_labels, gt_boxes, prompt_mask, 1.0)
    assert perfect["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert perfect["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert perfect["loss_class"].item() < 1e-6
    far = detection_loss(*_prediction([0.7, 0.5, 0.2, 0.2]), matches, gt_labels, gt_boxes,
                         prompt_mask, 1.0)
    near = detection_loss(*_prediction([0.6, 0.5, 0.2, 0.2]), matches, gt_labels, gt_boxes,
                          prompt_mask, 1.0)
    assert far["loss_bbox"] > near["loss_bbox"] > perfect["loss_bbox"]
    assert far["loss_giou"] > near["loss_giou"]
    total = sum(far.values())
    total.backward()


def test_focal_ignores_padded_prompts():
    logits = torch.tensor([[[1.0, float("-inf")]]], requires_grad=True)
    targets = torch.zeros(1, 1, 2)
    mask = torch.tensor([[True, False]])
    loss = sigmoid_focal_loss(logits, targets, mask)
    assert loss[0, 0, 1] == 0 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1] == 0
    # by hand for the valid entry: p = sigmoid(1), target 0 -> (1-a) p^2 (-log(1-p))
    p = 1 / (1 + math.exp(-1))
    assert loss[0, 0, 0].item() == pytest.approx(0.75 * p**2 * -math.log(1 - p), abs=1e-6)


def test_num_boxes_without_distributed():
    assert num_boxes_across_workers(torch.tensor([[True, False], [True, True]])) == 3.0
    assert num_boxes_across_workers(torch.zeros(2, 2, dtype=torch.bool)) == 1.0
