import pytest
import torch

from dinor1.model.denoising import (
    additive_attention_mask,
    build_denoising_queries,
    inverse_sigmoid,
    split_denoising_outputs,
)

NUM_QUERIES = 10


def _targets():
    return [
        {
            "labels": torch.tensor([0, 2, 1]),
            "boxes": torch.tensor(
                [[0.5, 0.5, 0.2, 0.3], [0.4, 0.6, 0.1, 0.1], [0.55, 0.45, 0.2, 0.2]]
            ),
        },
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]])},
    ]


def _prompts(requires_grad=False):
    embeddings = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    return embeddings.requires_grad_(requires_grad)


PROMPT_MASK = torch.tensor([True, True, True, False])


def _build(**kwargs):
    kwargs.setdefault("prompt_mask", PROMPT_MASK)
    kwargs.setdefault("num_dn_queries", 12)
    kwargs.setdefault("generator", torch.Generator().manual_seed(1))
    return build_denoising_queries(
        _targets(), kwargs.pop("prompts", _prompts()), NUM_QUERIES, **kwargs
    )


def _slots(meta, image, negative):
    """dn slot indices and gt indices of one image, positives or negatives."""
    slots, gts = meta.positive_pairs[image]
    if negative:
        slots = meta.negative_indices[image]
    return slots, gts


def test_shapes_and_counts():
    dn = _build()
    assert (dn.meta.num_groups, dn.meta.max_gt, dn.meta.num_dn) == (2, 3, 12)
    assert dn.content.shape == (2, 12, 8)
    assert dn.reference_logits.shape == (2, 12, 4)
    assert dn.labels.shape == (2, 12)
    assert dn.attn_mask.shape == (22, 22) and dn.attn_mask.dtype == torch.bool
    assert [len(p[0]) for p in dn.meta.positive_pairs] == [6, 2]
    assert [len(p[1]) for p in dn.meta.positive_pairs] == [6, 2]
    assert [len(n) for n in dn.meta.negative_indices] == [6, 2]
    # Image 0 fills every slot; image 1 has one GT, so 2 of each 3-slot half are padding.
    assert (dn.labels[0] >= 0).all()
    pad = dn.labels[1] == -1
    assert pad.sum() == 8
    assert torch.equal(dn.content[1][pad], torch.zeros(8, 8))
    assert torch.equal(dn.reference_logits[1][pad], torch.zeros(8, 4))


def test_no_noise_reproduces_ground_truth():
    prompts = _prompts()
    dn = _build(prompts=prompts, label_noise_ratio=0.0, box_noise_scale=0.0)
    for image, target in enumerate(_targets()):
        for negative in (False, True):
            slots, gts = _slots(dn.meta, image, negative)
            assert torch.equal(dn.labels[image, slots], target["labels"][gts])
            boxes = dn.reference_logits[image, slots].sigmoid()
            torch.testing.assert_close(boxes, target["boxes"][gts], atol=1e-5, rtol=0)
            assert torch.equal(dn.content[image, slots], prompts[image, target["labels"][gts]])


def test_shared_prompt_embeddings_are_broadcast():
    shared = _prompts()[0]
    dn = _build(prompts=shared, label_noise_ratio=0.0)
    assert torch.equal(dn.content[1, 0], shared[2])


def test_box_noise_magnitudes_follow_dino():
    dn = _build(label_noise_ratio=0.0, box_noise_scale=1.0)
    for image, target in enumerate(_targets()):
        for negative in (False, True):
            slots, gts = _slots(dn.meta, image, negative)
            gt = target["boxes"][gts]
            half = gt[:, 2:].repeat(1, 2) / 2
            gt_xyxy = torch.cat([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2], dim=1)
            noised = dn.reference_logits[image, slots].sigmoid()
            xyxy = torch.cat(
                [noised[:, :2] - noised[:, 2:] / 2, noised[:, :2] + noised[:, 2:] / 2], dim=1
            )
            # Boxes sit in the centre, so clamping to [0, 1] never interferes.
            assert ((xyxy > 0) & (xyxy < 1)).all()
            moved = (xyxy - gt_xyxy).abs() / half
            if negative:
                # Opposite corners can cross: the size clamps to ~0 (DINO keeps such boxes),
                # so corners are only recoverable on axes whose size stayed positive.
                kept = (noised[:, 2:] > 1e-4).repeat(1, 2)
                assert kept.float().mean() > 0.5
                moved = moved[kept]
                assert (moved >= 1 - 1e-3).all() and (moved < 2 + 1e-3).all()
            else:
                assert (moved < 1 + 1e-3).all()


def test_label_noise_draws_only_valid_prompts():
    dn = _build(label_noise_ratio=1.0, box_noise_scale=0.0, num_dn_queries=600)
    labels = dn.labels[dn.labels >= 0]
    assert (labels != 3).all()
    assert set(labels.tolist()) == {0, 1, 2}
    noised = torch.cat([dn.labels[i, dn.meta.positive_pairs[i][0]] for i in range(2)])
    expected = torch.cat([_targets()[i]["labels"][dn.meta.positive_pairs[i][1]] for i in range(2)])
    assert (noised != expected).any()


def test_label_noise_respects_per_image_prompt_mask():
    mask = torch.tensor([[True, True, True, False], [False, False, True, False]])
    dn = _build(prompt_mask=mask, label_noise_ratio=1.0, num_dn_queries=600)
    assert set(dn.labels[1][dn.labels[1] >= 0].tolist()) == {2}
    assert 3 not in dn.labels[0].tolist()


def test_attention_mask_follows_dino_cdn():
    dn = _build()
    mask, num_dn, group_size = dn.attn_mask, dn.meta.num_dn, 2 * dn.meta.max_gt
    assert mask[num_dn:, :num_dn].all()  # matching queries cannot see dn queries
    assert not mask[num_dn:, num_dn:].any()
    assert not mask[:num_dn, num_dn:].any()  # DINO lets dn queries see matching queries
    for i in range(dn.meta.num_groups):
        rows = slice(i * group_size, (i + 1) * group_size)
        for j in range(dn.meta.num_groups):
            cols = slice(j * group_size, (j + 1) * group_size)
            assert mask[rows, cols].all() if i != j else not mask[rows, cols].any()


def test_additive_mask():
    dn = _build()
    additive = additive_attention_mask(dn.attn_mask, torch.float16)
    assert additive.dtype == torch.float16
    assert (additive[dn.attn_mask] == torch.finfo(torch.float16).min).all()
    assert (additive[~dn.attn_mask] == 0).all()


def test_seeded_generator_is_deterministic():
    a, b = _build(), _build()
    for name in ("content", "reference_logits", "labels", "attn_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = _build(generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.reference_logits, c.reference_logits)


def test_gradient_flows_to_prompt_embeddings():
    prompts = _prompts(requires_grad=True)
    dn = _build(prompts=prompts)
    dn.content.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # Invalid prompt 3 is never a label, so it receives no gradient.
    assert torch.equal(prompts.grad[:, 3], torch.zeros(2, 8))


def test_no_ground_truth_returns_none():
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert build_denoising_queries(empty, _prompts(), NUM_QUERIES) is None
    assert build_denoising_queries([], _prompts()[0], NUM_QUERIES) is None


@pytest.mark.parametrize("dim", [1, -2])
def test_split_round_trips(dim):
    outputs = torch.randn(2, 12 + NUM_QUERIES, 8)
    dn_part, matching = split_denoising_outputs(outputs, 12, dim=dim)
    assert dn_part.shape == (2, 12, 8) and matching.shape == (2, NUM_QUERIES, 8)
    assert torch.equal(torch.cat([dn_part, matching], dim=dim), outputs)


def test_inverse_sigmoid_is_finite_at_the_border():
    logits = inverse_sigmoid(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(logits).all() and logits[1] == 0
