"""The objectives do their arithmetic in fp32 whatever dtype the model's outputs arrive in.

Training runs under bf16 autocast, so logits and boxes reach the objectives in bf16. The only
bf16 error the objectives may show is the rounding of those INPUTS: each function applied to bf16
inputs must equal the same function applied to the bf16-rounded inputs cast back to fp32.
"""

import math

import pytest
import torch

from dinor1.objectives.detection import detection_loss
from dinor1.objectives.grqo import grqo_loss, objectness_kl
from dinor1.objectives.matcher import matching_cost
from dinor1.objectives.settings import GRQOSettings, LossSettings

INF = float("inf")
BF16 = torch.bfloat16
TIGHT = dict(rtol=1e-6, atol=1e-6)  # fp32 ops on identical fp32 values: no bf16 arithmetic
COST_W, LOSS_W = LossSettings().matching_weights(), LossSettings().loss_weights()
GRQO_W = dict(alpha=GRQOSettings().alpha, beta=GRQOSettings().beta)


def _sigmoid64(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _detection_inputs(seed: int = 0):
    """2 images, 5 queries, 3 prompts (prompt 2 of image 1 padded: -inf), 2 GTs (one padded)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 3, generator=g) * 6  # wide: reaches bf16 sigmoid saturation
    logits[0, 0, 0] = 7.0
    logits[1, :, 2] = -INF
    boxes = torch.rand(2, 5, 4, generator=g) * 0.4 + 0.2
    gt_labels = torch.tensor([[0, 2], [1, -1]])
    gt_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.2, 0.2]],
                             [[0.4, 0.4, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]])
    gt_mask = gt_labels >= 0
    prompt_mask = torch.tensor([[True, True, True], [True, True, False]])
    return logits, boxes, gt_labels, gt_boxes, gt_mask, prompt_mask


def _as_bf16_and_rounded(*tensors):
    """Each tensor in bf16, and the same bf16 values back in fp32."""
    low = [t.to(BF16) for t in tensors]
    return low, [t.float() for t in low]


def test_matching_cost_from_bf16_inputs_is_fp32_math():
    logits, boxes, gt_labels, gt_boxes, _, _ = _detection_inputs()
    logits, boxes = torch.stack([logits, -logits]), torch.stack([boxes, boxes.flip(1)])
    (lo_logits, lo_boxes), (hi_logits, hi_boxes) = _as_bf16_and_rounded(logits, boxes)
    cost = matching_cost(lo_logits, lo_boxes, gt_labels, gt_boxes, **COST_W)
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, matching_cost(hi_logits, hi_boxes, gt_labels, gt_boxes,
                                                   **COST_W), **TIGHT)


def test_matching_cost_logit_7_is_not_saturated():
    # sigmoid(7) rounds to 1.0 in bf16, which made -log(1 - p + 1e-8) 18.4 instead of ~7.0.
    # alpha = 0 and no box terms leave cost = -p^2 * -log(1 - p + 1e-8).
    logits = torch.tensor([[[7.0]]], dtype=BF16)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], dtype=BF16)
    cost = matching_cost(logits, boxes, torch.tensor([[0]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
                         class_weight=1.0, bbox_weight=0.0, giou_weight=0.0, alpha=0.0,
                         gamma=2.0)
    p = _sigmoid64(7.0)
    neg_log = -math.log(1 - p + 1e-8)
    assert neg_log == pytest.approx(7.0009, abs=1e-4)
    assert cost.item() == pytest.approx(-(p**2) * neg_log, rel=1e-5)


def test_objectness_kl_from_bf16_inputs_is_fp32_math():
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(3, 7, generator=g) * 5
    ref = policy + torch.randn(3, 7, generator=g) * 0.1
    (lo_policy, lo_ref), (hi_policy, hi_ref) = _as_bf16_and_rounded(policy, ref)
    kl = objectness_kl(lo_policy, lo_ref)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, objectness_kl(hi_policy, hi_ref), **TIGHT)


def _k3_float64(x: float, y: float, eps: float = 2e-9) -> tuple[float, float]:
    """k3 KL and its derivative wrt the policy logit x (reference logit y), in float64."""
    p, r = _sigmoid64(x), _sigmoid64(y)
    kl = (r + eps) / (p + eps) - math.log(r + eps) + math.log(p + eps) - 1
    dkl_dp = -(r + eps) / (p + eps) ** 2 + 1 / (p + eps)
    return kl, dkl_dp * p * (1 - p)


@pytest.mark.parametrize("x, y", [(-8.0, -7.9375), (0.0, 0.0078125)])
def test_objectness_kl_small_drift_from_bf16(x, y):
    # Both logits are exact in bf16. In bf16 arithmetic sigmoid(0.0078125) rounds to 0.5, so the
    # second pair gave exactly 0 (and no gradient); the first was off by several percent.
    policy = torch.tensor([x], dtype=BF16, requires_grad=True)
    kl = objectness_kl(policy, torch.tensor([y], dtype=BF16))
    expected, expected_grad = _k3_float64(x, y)
    assert kl.dtype == torch.float32
    assert kl.item() > 0 and kl.item() == pytest.approx(expected, rel=1e-4)
    kl.sum().backward()
    assert policy.grad.item() != 0
    # the leaf is bf16, so its gradient is rounded to bf16 (relative 2^-9)
    assert policy.grad.item() == pytest.approx(expected_grad, rel=4e-3)


def _grqo_inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randn(2, 2, 6, 3, generator=g) * 3 + 1  # [L, B, Q, G]
    gt_mask = torch.tensor([[True, False, True], [False, False, False]])
    policy = torch.randn(2, 6, generator=g) * 4
    ref = policy + torch.randn(2, 6, generator=g) * 0.05
    scores = torch.randn(2, 2, 6, generator=g) * 6
    return cost, gt_mask, policy, ref, scores


@pytest.mark.parametrize("form", ["release", "policy_gradient"])
def test_grqo_loss_from_bf16_inputs_is_fp32_math(form):
    cost, gt_mask, policy, ref, scores = _grqo_inputs()
    low, high = _as_bf16_and_rounded(cost, policy, ref, scores)
    results = []
    for cost_, policy_, ref_, scores_ in (low, high):
        leaves = [t.clone().requires_grad_(True) for t in (cost_, policy_, scores_)]
        loss, diag = grqo_loss(leaves[0], gt_mask, leaves[1], ref_, form=form, alpha=0.5,
                               beta=0.5, num_mute=2, scores=leaves[2])
        loss.backward()
        results.append((loss, diag, [t.grad for t in leaves]))
    (loss, diag, grads), (ref_loss, ref_diag, ref_grads) = results
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TIGHT)
    for name, value in ref_diag.items():
        assert float(diag[name]) == pytest.approx(float(value), rel=1e-6, abs=1e-6), name
    for grad, ref_grad in zip(grads, ref_grads):
        # bf16 leaves receive the fp32 gradient rounded to bf16
        if ref_grad is None:
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, ref_grad.to(BF16), rtol=0, atol=0)


def test_detection_loss_from_bf16_inputs_is_fp32_math():
    logits, boxes, gt_labels, gt_boxes, _, prompt_mask = _detection_inputs()
    matches = [(torch.tensor([0, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    (lo_logits, lo_boxes), (hi_logits, hi_boxes) = _as_bf16_and_rounded(logits, boxes)
    out = detection_loss(lo_logits, lo_boxes, matches, gt_labels, gt_boxes, prompt_mask, 3.0,
                         **LOSS_W)
    expected = detection_loss(hi_logits, hi_boxes, matches, gt_labels, gt_boxes, prompt_mask, 3.0,
                              **LOSS_W)
    for name, value in expected.items():
        assert out[name].dtype == torch.float32, name
        torch.testing.assert_close(out[name], value, **TIGHT)


def test_autocast_keeps_fp32_math():
    logits, boxes, gt_labels, gt_boxes, gt_mask, prompt_mask = _detection_inputs()
    (lo_logits, lo_boxes), (hi_logits, hi_boxes) = _as_bf16_and_rounded(logits, boxes)
    matches = [(torch.tensor([0, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    cost_ref = matching_cost(hi_logits[None], hi_boxes[None], gt_labels, gt_boxes, **COST_W)
    det_ref = detection_loss(hi_logits, hi_boxes, matches, gt_labels, gt_boxes, prompt_mask, 3.0,
                             **LOSS_W)
    policy, ref = hi_logits[:, :, 0], hi_logits[:, :, 1] + 0.25
    grqo_ref = {form: grqo_loss(cost_ref, gt_mask, policy, ref, form=form, num_mute=1, **GRQO_W,
                                scores=hi_logits.max(-1).values[None])[0]
                for form in ("release", "policy_gradient")}
    with torch.autocast("cpu", dtype=BF16):
        cost = matching_cost(lo_logits[None], lo_boxes[None], gt_labels, gt_boxes, **COST_W)
        det = detection_loss(lo_logits, lo_boxes, matches, gt_labels, gt_boxes, prompt_mask, 3.0,
                             **LOSS_W)
        grqo = {form: grqo_loss(cost, gt_mask, policy.to(BF16), ref.to(BF16), form=form,
                                num_mute=1, **GRQO_W, scores=lo_logits.max(-1).values[None])[0]
                for form in ("release", "policy_gradient")}
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, cost_ref, **TIGHT)
    for name, value in det_ref.items():
        assert det[name].dtype == torch.float32
        torch.testing.assert_close(det[name], value, **TIGHT)
    for form, value in grqo_ref.items():
        assert grqo[form].dtype == torch.float32
        torch.testing.assert_close(grqo[form], value, **TIGHT)
