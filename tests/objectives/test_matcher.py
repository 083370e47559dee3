"""Matcher: GIoU and matching cost against hand-worked numbers, Hungarian against brute force."""

import itertools
import math

import pytest
import torch

from dinor1.objectives.detection import detection_loss
from dinor1.objectives.matcher import (
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    hungarian_match,
    matching_cost,
)

INF = float("inf")
# the weights the hand-worked numbers use (the release's, the config defaults)
W = dict(class_weight=2.0, bbox_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)
LOSS_W = dict(class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, alpha=0.25, gamma=2.0)


def test_cxcywh_to_xyxy():
    out = box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    assert torch.allclose(out, torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_giou_by_hand():
    big = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert generalized_box_iou(big, big).item() == pytest.approx(1.0)
    # disjoint diagonal: [0,0,1,1] vs [2,2,3,3]: IoU 0, union 1+1 = 2, hull 3x3 = 9 -> -(9-2)/9
    unit, far = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 2, 3, 3]])
    assert generalized_box_iou(unit, far).item() == pytest.approx(-7 / 9)
    # nested: [0,0,1,1] in [0,0,2,2]: IoU 1/4, hull = union -> 1/4
    assert generalized_box_iou(unit, big).item() == pytest.approx(0.25)
    # partial: [0,0,2,2] vs [1,1,3,3]: inter 1, union 4+4-1 = 7, hull 9 -> 1/7 - 2/9 = -5/63
    shifted = torch.tensor([[1.0, 1, 3, 3]])
    assert generalized_box_iou(big, shifted).item() == pytest.approx(-5 / 63)


def test_giou_batched_pairwise():
    a = torch.tensor([[[0.0, 0, 2, 2], [0, 0, 1, 1]], [[1.0, 1, 3, 3], [2, 2, 3, 3]]])  # [2, 2, 4]
    b = torch.tensor([[[0.0, 0, 2, 2], [2, 2, 3, 3], [1, 1, 3, 3]]]).expand(2, -1, -1)  # [2, 3, 4]
    out = generalized_box_iou(a, b)
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0].item() == pytest.approx(1.0)
    assert out[0, 1, 1].item() == pytest.approx(-7 / 9)
    assert out[0, 0, 2].item() == pytest.approx(-5 / 63)
    assert out[1, 1, 1].item() == pytest.approx(1.0)


def _one_image():
    """One image, GT 0 = prompt 1 with box (0.5, 0.5, 0.4, 0.4), GT 1 = padding; two queries.

    Prompt 0 is -inf everywhere so the padded GT (label -1, gathered as prompt 0) sees p = 0.
    """
    gt_labels = torch.tensor([[1, -1]])
    gt_boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    # p(prompt 1) = sigmoid(0) = 0.5 for query 0, sigmoid(log(1/3)) = 1/(1+3) = 0.25 for query 1
    logits = torch.tensor([[[-INF, 0.0], [-INF, math.log(1 / 3)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.2, 0.2]]])
    return logits, boxes, gt_labels, gt_boxes


def test_matching_cost_by_hand():
    logits, boxes, gt_labels, gt_boxes = _one_image()
    cost = matching_cost(logits, boxes, gt_labels, gt_boxes, **W)
    assert cost.shape == (1, 2, 2)
    # query 0: p = 0.5. pos = 0.25 * 0.5^2 * ln 2, neg = 0.75 * 0.5^2 * ln 2;
    # box identical -> L1 0, GIoU 1.  cost = 2 * (pos - neg) + 5 * 0 - 2 * 1
    pos0, neg0 = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    assert cost[0, 0, 0].item() == pytest.approx(2 * (pos0 - neg0) - 2.0, abs=1e-5)
    # query 1: p = 0.25. pos = 0.25 * 0.75^2 * -ln(0.25), neg = 0.75 * 0.25^2 * -ln(0.75);
    # box (0.5,0.5,0.2,0.2) nested in the GT: L1 = 0.2 + 0.2 = 0.4; IoU = 0.04/0.16 = 0.25 = GIoU
    pos1, neg1 = 0.25 * 0.5625 * -math.log(0.25), 0.75 * 0.0625 * -math.log(0.75)
    expected1 = 2 * (pos1 - neg1) + 5 * 0.4 - 2 * 0.25
    assert cost[0, 1, 0].item() == pytest.approx(expected1, abs=1e-5)
    assert torch.isfinite(cost).all()  # padded column included


def test_matching_cost_layers_and_weights():
    logits, boxes, gt_labels, gt_boxes = _one_image()
    other_boxes = boxes.flip(1)
    stacked = torch.stack([logits, logits]).requires_grad_(True)
    cost = matching_cost(stacked, torch.stack([boxes, other_boxes]), gt_labels, gt_boxes, **W)
    assert cost.shape == (2, 1, 2, 2)
    assert torch.allclose(cost[0], matching_cost(logits, boxes, gt_labels, gt_boxes, **W))
    assert torch.allclose(cost[1], matching_cost(logits, other_boxes, gt_labels, gt_boxes, **W))
    assert torch.isfinite(cost).all()
    cost.sum().backward()
    assert torch.isfinite(stacked.grad).all()
    # only the box terms: query 1 of layer 0 -> 5 * 0.4 - 2 * 0.25 = 1.5
    boxes_only = matching_cost(logits, boxes, gt_labels, gt_boxes, **{**W, "class_weight": 0})
    assert boxes_only[0, 1, 0].item() == pytest.approx(1.5, abs=1e-6)


def _brute_force(cost: torch.Tensor, gts: list[int]) -> float:
    queries = cost.shape[0]
    return min(sum(cost[q, j].item() for q, j in zip(perm, gts))
               for perm in itertools.permutations(range(queries), len(gts)))


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    layers, batch, queries, num_gt = 2, 3, 4, 3
    cost = torch.randn(layers, batch, queries, num_gt, generator=g)
    gt_mask = torch.rand(batch, num_gt, generator=g) > 0.4
    gt_mask[0] = True  # at least one image with every GT valid
    matches = hungarian_match(cost, gt_mask)
    assert len(matches) == layers and all(len(m) == batch for m in matches)
    for layer in range(layers):
        for b in range(batch):
            q, j = matches[layer][b]
            gts = gt_mask[b].nonzero().flatten().tolist()
            assert q.dtype == j.dtype == torch.long
            assert sorted(j.tolist()) == gts  # every valid GT once, no padded one
            assert q.tolist() == sorted(set(q.tolist()))  # distinct queries, sorted
            got = sum(cost[layer, b, qi, ji].item() for qi, ji in zip(q.tolist(), j.tolist()))
            assert got == pytest.approx(_brute_force(cost[layer, b], gts))


def test_hungarian_without_layer_dim_and_empty_image():
    cost = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [5.0, 5.0]],
                         [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])  # [B=2, Q=3, G=2]
    gt_mask = torch.tensor([[True, True], [False, False]])
    matches = hungarian_match(cost, gt_mask)
    assert len(matches) == 2
    assert matches[0][0].tolist() == [0, 1] and matches[0][1].tolist() == [0, 1]
    assert matches[1][0].numel() == 0 and matches[1][1].numel() == 0


def test_matching_cost_gradients_finite_with_inf_logits():
    # GT 0 asks for prompt 1, which is -inf for query 0 (p = 0); GT 1 is padding (prompt 0).
    logits = torch.tensor([[[-INF, -INF], [2.0, -1.0], [-INF, 30.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3], requires_grad=True)
    gt_labels, gt_boxes = torch.tensor([[1, -1]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.0] * 4]])
    cost = matching_cost(logits, boxes, gt_labels, gt_boxes,
                         **{**W, "bbox_weight": 0.0, "giou_weight": 0.0})
    # p = 0: pos = 0.25 * 1 * -log(1e-8), neg = 0.75 * 0 * ... = 0 -> 2 * 0.25 * 8 ln 10
    assert cost[0, 0, 0].item() == pytest.approx(2 * 0.25 * 8 * math.log(10), rel=1e-6)
    cost.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert logits.grad[0, 0].tolist() == [0.0, 0.0]  # both -inf: no gradient
    assert logits.grad[0, 1, 0] != 0 and logits.grad[0, 1, 1] != 0


def test_nan_logits_still_match_and_loss_stays_nan():
    logits, boxes, gt_labels, gt_boxes = _one_image()
    logits = logits.clone()
    logits[0, 0, 1] = float("nan")
    cost = matching_cost(logits, boxes, gt_labels, gt_boxes, **W)
    assert torch.isnan(cost[0, 0, 0])
    cost[0, 1, 1] = INF  # scipy reports an infeasible problem for inf costs
    gt_mask = gt_labels >= 0
    matches = hungarian_match(cost, gt_mask)  # no ValueError from scipy
    (queries, gts), = matches
    assert gts.tolist() == [0] and len(queries) == 1
    loss = detection_loss(logits, boxes, matches, gt_labels, gt_boxes,
                          torch.tensor([[True, True]]), 1.0, **LOSS_W)
    assert not torch.isfinite(loss["loss_class"])  # the training loop's guard skips the step


def test_best_match_cost_equals_the_full_minimum_in_value_and_gradient():
    """GRQO's reward needs min_j C_qj in the graph: recomputing only each query's best pair gives
    the same value and the same gradients as the minimum over the full [L, B, Q, G] cost."""
    from dinor1.objectives.matcher import best_match_cost

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, 4, generator=g).requires_grad_()
    boxes = (torch.rand(2, 3, 7, 4, generator=g) * 0.5 + 0.2).requires_grad_()
    gt_labels = torch.tensor([[0, 3, -1], [2, -1, -1], [-1, -1, -1]])
    gt_mask = gt_labels >= 0
    gt_boxes = torch.rand(3, 3, 4, generator=g) * 0.4 + 0.3
    full = matching_cost(logits, boxes, gt_labels, gt_boxes, **W)
    expected = full.masked_fill(~gt_mask[None, :, None, :], float("inf")).min(-1).values[:, :2]
    (expected_logits, expected_boxes) = torch.autograd.grad(expected.sum(), [logits, boxes])
    paired = best_match_cost(full.detach(), gt_mask, logits, boxes, gt_labels, gt_boxes, **W)
    assert paired.shape == (2, 3, 7)
    torch.testing.assert_close(paired[:, :2], expected, rtol=1e-6, atol=1e-6)
    got_logits, got_boxes = torch.autograd.grad(paired[:, :2].sum(), [logits, boxes])
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_boxes, expected_boxes, rtol=1e-6, atol=1e-6)
