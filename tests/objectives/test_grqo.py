"""GRQO functions against values worked out by hand."""

import math

import pytest
import torch

from dinor1.objectives.grqo import grqo_advantages, grqo_loss, objectness_kl, query_rewards

# one image, 3 queries, 2 GTs; the second image has no GT
COST = torch.tensor([[[1.0, 4.0], [3.0, 2.0], [5.0, 6.0]],
                     [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]]])
GT_MASK = torch.tensor([[True, True], [False, False]])
SQRT_VAR = math.sqrt(13 / 3)
INF = float("inf")  # rewards -1, -2, -5: mean -8/3, unbiased variance 13/3


def test_query_rewards_by_hand():
    rewards, has_gt = query_rewards(COST, GT_MASK, return_has_gt=True)
    assert rewards.tolist() == [[-1.0, -2.0, -5.0], [0.0, 0.0, 0.0]]
    assert has_gt.tolist() == [True, False]
    only_first = query_rewards(COST, torch.tensor([[True, False], [False, False]]))
    assert only_first[0].tolist() == [-1.0, -3.0, -5.0]
    per_layer = query_rewards(torch.stack([COST, COST + 1]), GT_MASK)
    assert per_layer.shape == (2, 2, 3) and per_layer[1, 0].tolist() == [-2.0, -3.0, -6.0]


def test_advantages_by_hand_with_and_without_mute():
    rewards = torch.tensor([[-1.0, -2.0, -5.0], [0.0, 0.0, 0.0]])
    has_gt = torch.tensor([True, False])
    expected = [(5 / 3) / SQRT_VAR, (2 / 3) / SQRT_VAR, (-7 / 3) / SQRT_VAR]
    adv = grqo_advantages(rewards, num_mute=0, has_gt=has_gt)
    torch.testing.assert_close(adv[0], torch.tensor(expected))
    assert adv[0].sum().abs() < 1e-6  # without the mute the group's advantages sum to 0
    assert adv[1].tolist() == [0.0, 0.0, 0.0]
    muted = grqo_advantages(rewards, num_mute=1, has_gt=has_gt)
    torch.testing.assert_close(muted[0], torch.tensor(expected[:2] + [0.0]))


def test_objectness_kl_by_hand_and_gradient_sign():
    same = torch.tensor([[-2.0, 0.0, 3.0]])
    assert objectness_kl(same, same).abs().max() < 1e-6
    policy = torch.tensor([0.0], requires_grad=True)  # p = 0.5
    ref = torch.tensor([math.log(3.0)])  # r = 0.75
    kl = objectness_kl(policy, ref)
    expected = 0.75 / 0.5 - math.log(0.75) + math.log(0.5) - 1
    assert kl.item() == pytest.approx(expected, abs=1e-6) and kl.item() > 0
    kl.sum().backward()
    # dKL/dp = -r/p^2 + 1/p = -1 at p = 0.5, r = 0.75; dp/ds = p(1-p) = 0.25
    assert policy.grad.item() == pytest.approx(-0.25, abs=1e-6)


def test_objectness_kl_saturated_and_infinite_logits():
    # p = sigmoid(40) and r = sigmoid(30) are both 1.0 in fp32, but 1 - r ~ e^-30 is not 1 - p:
    # log(r + eps) - log(p + eps) = log sigmoid(30) - log sigmoid(40) ~ e^-40 - e^-30, KL ~ 0.
    big = objectness_kl(torch.tensor([40.0]), torch.tensor([30.0]))
    assert 0 <= big.item() < 1e-20
    # p = 0 (-inf): the eps keeps it finite: (r + eps) / eps - log(r + eps) + log(eps) - 1
    policy = torch.tensor([-INF, 0.0], requires_grad=True)
    kl = objectness_kl(policy, torch.tensor([-20.0, -INF]))
    r, eps = 1 / (1 + math.exp(20.0)), 2e-9
    assert kl[0].item() == pytest.approx((r + eps) / eps - math.log(r + eps) + math.log(eps) - 1,
                                         rel=1e-5)
    # r = 0, p = 0.5: eps / (0.5 + eps) - log(eps) + log(0.5 + eps) - 1
    assert kl[1].item() == pytest.approx(eps / (0.5 + eps) - math.log(eps) + math.log(0.5 + eps)
                                         - 1, rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad[0] == 0


def _inputs():
    cost = torch.stack([COST, COST * 2]).requires_grad_(True)  # L = 2
    policy = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.5]])
    ref = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    return cost, policy, ref


def test_release_form_gradient_through_reward_and_weights():
    cost, policy, ref = _inputs()
    loss, diag = grqo_loss(cost, GT_MASK, policy, ref, form="release", alpha=0.01, beta=0.0,
                           num_mute=1)
    loss.backward()
    assert cost.grad is not None and cost.grad.abs().sum() > 0
    # beta = 0: loss = sum over layers of mean(-alpha * A); layer 1 and 2 have the same z-scores
    adv = grqo_advantages(torch.tensor([[-1.0, -2.0, -5.0], [0, 0, 0]]), 1,
                          torch.tensor([True, False]))
    assert loss.item() == pytest.approx(2 * (-0.01 * adv.mean().item()), abs=1e-7)
    doubled, _ = grqo_loss(cost, GT_MASK, policy, ref, form="release", alpha=0.02, beta=0.0,
                           num_mute=1)
    assert doubled.item() == pytest.approx(2 * loss.item(), abs=1e-7)
    kl_only, _ = grqo_loss(cost, GT_MASK, policy, ref, form="release", alpha=0.0, beta=0.04,
                           num_mute=0)
    kl = objectness_kl(policy, ref).mean().item()
    assert kl_only.item() == pytest.approx(2 * 0.04 * kl, abs=1e-7)  # added once per layer
    assert diag["grqo/muted_fraction"] == pytest.approx(1 / 3)
    assert float(diag["grqo/images_without_gt"]) == 1.0


def test_diagnostics_are_detached_tensors_by_hand():
    cost, policy, ref = _inputs()
    policy.requires_grad_(True)
    _, diag = grqo_loss(cost, GT_MASK, policy, ref, form="release", alpha=0.01, beta=0.04,
                        num_mute=1)
    static = {"grqo/muted_fraction", "grqo/layers"}  # known from shapes: plain floats
    for name, value in diag.items():
        if name in static:
            assert isinstance(value, float), name
        else:  # read by the caller in one device sync with the other logs
            assert isinstance(value, torch.Tensor) and value.dim() == 0, name
            assert value.dtype == torch.float32 and not value.requires_grad, name
    assert diag["grqo/layers"] == 2.0
    # only image 0 has GTs: rewards -1, -2, -5 (layer 0) and -2, -4, -10 (layer 1)
    assert float(diag["grqo/reward_mean"]) == pytest.approx(-4.0)
    assert float(diag["grqo/reward_std"]) == pytest.approx(1.5 * SQRT_VAR)
    # same z-scores in both layers; image 1's advantages are all 0; third query muted
    assert float(diag["grqo/advantage_max"]) == pytest.approx((5 / 3) / SQRT_VAR)
    assert float(diag["grqo/advantage_min"]) == 0.0
    assert float(diag["grqo/advantage_abs_mean"]) == pytest.approx((7 / 3) / SQRT_VAR / 6)
    # no image with a GT: statistics over all images (all rewards 0)
    _, empty = grqo_loss(cost, torch.zeros_like(GT_MASK), policy, ref, form="release",
                         alpha=0.01, beta=0.04, num_mute=0)
    assert float(empty["grqo/reward_mean"]) == 0.0
    assert float(empty["grqo/images_without_gt"]) == 2.0


def test_policy_gradient_form_has_no_gradient_through_reward():
    cost, policy, ref = _inputs()
    scores = torch.zeros(2, 2, 3, requires_grad=True)
    loss, _ = grqo_loss(cost, GT_MASK, policy, ref, form="policy_gradient", alpha=0.1,
                        beta=0.0, num_mute=1, scores=scores)
    loss.backward()
    assert cost.grad is None or cost.grad.abs().sum() == 0
    # d/ds of -alpha * A * log sigmoid(s) at s = 0 is -alpha * A * 0.5, averaged over B*Q = 6
    # per layer (alpha applies to this form too: it was ignored)
    adv = grqo_advantages(torch.tensor([[-1.0, -2.0, -5.0], [0, 0, 0]]), 1,
                          torch.tensor([True, False]))
    torch.testing.assert_close(scores.grad[0], -0.1 * adv * 0.5 / 6)


def test_policy_gradient_on_the_objectness_sums_every_layer_into_it():
    """``grqo.pg_score: objectness``: one [B, Q] score for all layers, so its gradient is the
    sum over layers of each layer's -alpha * A * (1 - sigmoid(s)) / (B * Q)."""
    cost, policy, ref = _inputs()
    objectness = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grqo_loss(cost, GT_MASK, policy, ref, form="policy_gradient", alpha=0.1,
                        beta=0.0, num_mute=1, scores=objectness)
    loss.backward()
    rewards = query_rewards(cost.detach(), GT_MASK)
    adv = grqo_advantages(rewards, 1, GT_MASK.any(-1))  # [L, B, Q]
    torch.testing.assert_close(objectness.grad, (-0.1 * adv * 0.5 / 6).sum(0))
    with pytest.raises(ValueError, match="form"):
        grqo_loss(cost, GT_MASK, policy, ref, form="ppo", alpha=0.1, beta=0.0, num_mute=1)
