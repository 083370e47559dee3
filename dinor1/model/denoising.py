"""Contrastive denoising (CDN) queries, as in DINO (Zhang et al. 2022), made open-set.

During training, DINO feeds the decoder extra "denoising" queries next to the matching queries:
noised copies of the ground-truth boxes that the decoder must reconstruct. They need no
Hungarian matching (each one knows its GT), which stabilises early training. CDN builds them in
``num_groups`` groups; each group holds, per image, ``max_gt`` POSITIVE slots (box jittered by
less than half its size in each xyxy coordinate, supervised to reconstruct the GT) followed by
``max_gt`` NEGATIVE slots (jittered by one to two half-sizes, supervised as "no object"), so the
decoder also learns to reject near-misses. Images with fewer than ``max_gt`` GTs leave pad slots.

Noise, following DINO's ``prepare_for_cdn``:
  * label noise: with probability ``label_noise_ratio * 0.5`` a slot's label is replaced by a
    uniformly drawn valid prompt;
  * box noise: on the xyxy corners, ``sign * magnitude * (w/2, h/2, w/2, h/2) * box_noise_scale``
    with magnitude in [0, 1) for positives and [1, 2) for negatives, then clamped to [0, 1].
    A negative's opposite corners may cross; its size then clamps to ~0, as in DINO.

Labels come from the prompts. In DINO-R1 a class label is an index into the U prompt embeddings
of the batch (prompt u is category u), so the content embedding of a dn slot is the embedding of
its (noised) prompt rather than a row of a fixed label table: the model stays open-set and the
dn loss also trains the prompt encoder (``content`` is a gather, gradients reach the prompts).

Attention mask over ``[dn queries ; matching queries]`` (bool, True = blocked, the convention of
``torch.nn.MultiheadAttention``), exactly DINO's ``prepare_for_cdn``
(IDEA-Research/DINO, ``models/dino/dn_components.py``):
  * matching queries cannot see any dn query, because GT information must not leak into them;
  * a dn group cannot see other dn groups, so each group denoises independently;
  * dn queries CAN see the matching queries (DINO blocks nothing in that direction).
Within a group everything is visible, pad slots included (DINO does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DenoisingMeta:
    """What is needed to split decoder outputs and build the dn loss.

    Attributes:
        num_dn: Nd, the number of dn queries placed before the matching queries.
        num_groups: number of CDN groups.
        max_gt: largest GT count in the batch (slots per half-group).
        positive_pairs: per image, (dn query indices [k], gt indices [k]) of the positive slots,
            k = num_groups * n_b.
        negative_indices: per image, dn query indices [num_groups * n_b] of the negative slots,
            in the same (group, gt) order as positive_pairs.
    """

    num_dn: int
    num_groups: int
    max_gt: int
    positive_pairs: list[tuple[torch.Tensor, torch.Tensor]]
    negative_indices: list[torch.Tensor]


@dataclass
class DenoisingQueries:
    """The dn queries of one batch.

    Attributes:
        content: [B, Nd, d] prompt embedding of each slot's noised label; zeros for pad slots.
        reference_logits: [B, Nd, 4] float32 inverse-sigmoid of the noised cxcywh boxes; 0 for
            pad slots (box (0.5, 0.5, 0.5, 0.5), as DINO's zero padding).
        labels: [B, Nd] noised labels (prompt indices); -1 for pad slots.
        attn_mask: [Nd + Q, Nd + Q] bool, True = the row query may NOT attend the column query.
        meta: see `DenoisingMeta`.
    """

    content: torch.Tensor
    reference_logits: torch.Tensor
    labels: torch.Tensor
    attn_mask: torch.Tensor
    meta: DenoisingMeta


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` clamped to [eps, 1 - eps] so boxes touching the border stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    center, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


def _xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], dim=-1)


def build_denoising_queries(
    targets: list[dict[str, torch.Tensor]],
    prompt_embeddings: torch.Tensor,
    num_queries: int,
    *,
    prompt_mask: torch.Tensor | None = None,
    num_dn_queries: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """Builds the CDN queries, their attention mask and the bookkeeping for the dn loss.

    Slot ``s`` of an image is ``(group * 2 + is_negative) * max_gt + gt_index``.

    Args:
        targets: B dicts with "labels" [n_b] (prompt indices in [0, U)) and "boxes" [n_b, 4]
            (normalised cx, cy, w, h).
        prompt_embeddings: [B, U, d] per image, or [U, d] shared by the batch.
        num_queries: Q, the number of matching queries that follow the dn queries.
        prompt_mask: [B, U] or [U] bool, True = valid prompt; label noise draws only valid ones.
            None means all prompts are valid.
        num_dn_queries: budget for dn queries; num_groups = max(1, budget // (2 * max_gt)).
        label_noise_ratio: a slot's label is resampled with probability ``ratio * 0.5``.
        box_noise_scale: scale of the box jitter (0 disables it).
        generator: source of all randomness (must live on the embeddings' device).

    Returns:
        The `DenoisingQueries`, or None when the batch has no GT box at all.
    """
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts, default=0)
    if max_gt == 0:
        return None
    batch_size, device = len(targets), prompt_embeddings.device
    if prompt_embeddings.dim() == 2:
        prompt_embeddings = prompt_embeddings.expand(batch_size, -1, -1)
    num_prompts, dim = prompt_embeddings.shape[1:]
    num_groups = max(1, num_dn_queries // (2 * max_gt))
    num_dn = num_groups * 2 * max_gt

    # Layout [B, groups, positive/negative, max_gt], flattened to [B, Nd] at the end.
    shape = (batch_size, num_groups, 2, max_gt)
    labels = torch.full(shape, -1, dtype=torch.long, device=device)
    boxes = torch.zeros(shape + (4,), device=device)
    for b, t in enumerate(targets):
        labels[b, :, :, : num_gts[b]] = t["labels"].to(device)
        boxes[b, :, :, : num_gts[b]] = t["boxes"].to(device=device, dtype=torch.float32)
    labels, boxes = labels.flatten(1), boxes.flatten(1, 3)
    valid = labels >= 0
    negative = torch.zeros(shape, dtype=torch.bool, device=device)
    negative[:, :, 1] = True
    negative = negative.flatten(1)

    if label_noise_ratio > 0:
        if prompt_mask is None:
            prompt_mask = torch.ones(num_prompts, dtype=torch.bool, device=device)
        prompt_mask = prompt_mask.to(device).expand(batch_size, num_prompts)
        # Stable sort puts each image's valid prompt indices first, so a uniform draw in
        # [0, num_valid) picks uniformly among them.
        valid_first = torch.argsort((~prompt_mask).int(), dim=1, stable=True)
        num_valid = prompt_mask.sum(dim=1, keepdim=True)
        flip = torch.rand(labels.shape, generator=generator, device=device)
        pick = torch.rand(labels.shape, generator=generator, device=device)
        pick = (pick * num_valid).long().clamp(max=num_prompts - 1)
        noised = valid_first.gather(1, pick)
        replace = (flip < label_noise_ratio * 0.5) & valid & (num_valid > 0)
        labels = torch.where(replace, noised, labels)

    if box_noise_scale > 0:
        half_size = boxes[..., 2:].repeat(1, 1, 2) / 2
        sign = torch.randint(0, 2, boxes.shape, generator=generator, device=device) * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, generator=generator, device=device)
        magnitude = magnitude + negative.unsqueeze(-1).float()
        xyxy = _cxcywh_to_xyxy(boxes) + sign * magnitude * half_size * box_noise_scale
        boxes = _xyxy_to_cxcywh(xyxy.clamp(min=0.0, max=1.0))

    reference_logits = torch.where(valid.unsqueeze(-1), inverse_sigmoid(boxes), 0.0)
    gathered = prompt_embeddings.gather(1, labels.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim))
    content = torch.where(valid.unsqueeze(-1), gathered, torch.zeros_like(gathered))

    size = num_dn + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // (2 * max_gt)
    attn_mask[:num_dn, :num_dn] = group.unsqueeze(1) != group.unsqueeze(0)

    group_start = torch.arange(num_groups, device=device).unsqueeze(1) * 2 * max_gt
    positive_pairs, negative_indices = [], []
    for n in num_gts:
        gt_index = torch.arange(n, device=device)
        positive_pairs.append(((group_start + gt_index).flatten(), gt_index.repeat(num_groups)))
        negative_indices.append((group_start + max_gt + gt_index).flatten())

    meta = DenoisingMeta(num_dn, num_groups, max_gt, positive_pairs, negative_indices)
    return DenoisingQueries(content, reference_logits, labels, attn_mask, meta)


def additive_attention_mask(
    attn_mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Bool mask (True = blocked) -> additive float mask: 0 where allowed, dtype's min elsewhere.

    The finite minimum (rather than -inf) matches Hugging Face attention masks and cannot turn a
    softmax row into NaN.
    """
    additive = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
    return additive.masked_fill(attn_mask, torch.finfo(dtype).min)


def split_denoising_outputs(
    tensor: torch.Tensor, num_dn: int, dim: int = -2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [..., Nd + Q, ...] along `dim` into (dn part [..., Nd, ...], matching part)."""
    dn_part, matching_part = tensor.split([num_dn, tensor.shape[dim] - num_dn], dim=dim)
    return dn_part, matching_part
