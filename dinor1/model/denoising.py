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

from dinor1.model.randomness import draw_on


@dataclass
class DenoisingMeta:
    """What is needed to split decoder outputs and build the dn loss.

    Attributes:
        num_dn: Nd, the number of dn queries placed before the matching queries.
        num_groups: number of CDN groups.
        max_gt: largest GT count in the batch (slots per half-group).
        positive_pairs: per image, (dn query indices [k], gt indices [k]) of the positive slots,
            k = num_groups * m_b with m_b = the image's denoised GTs (all n_b of them unless it
            has more than the budget allows).
        negative_indices: per image, dn query indices [num_groups * m_b] of the negative slots,
            in the same (group, gt) order as positive_pairs.
        denoised_boxes: sum of m_b over the batch.
        total_boxes: sum of n_b over the batch.
    """

    num_dn: int
    num_groups: int
    max_gt: int
    positive_pairs: list[tuple[torch.Tensor, torch.Tensor]]
    negative_indices: list[torch.Tensor]
    denoised_boxes: int = 0
    total_boxes: int = 0

    @property
    def denoised_fraction(self) -> float:
        """Share of the batch's GT boxes that got dn queries (1.0 unless an image is denser than
        the budget allows)."""
        return self.denoised_boxes / self.total_boxes if self.total_boxes else 1.0


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

    Slot ``s`` of an image is ``(group * 2 + is_negative) * max_gt + slot_index``.

    The dn queries never exceed the budget (``num_dn_queries >= 2``): ``num_groups = budget //
    (2 * max_gt)``, at least 1, as DINO's dynamic groups; and where an image has more than
    ``budget // 2`` boxes (dense data: Objects365 and LVIS images carry 100-300), a random
    ``budget // 2`` of them are denoised this step (DINO would make ``2 * n`` dn queries and the
    decoder's self-attention grows with their square). The boxes left out still take part in the
    matching and detection losses; ``meta.denoised_boxes`` / ``meta.total_boxes`` say how many
    were denoised.

    Args:
        targets: B dicts with "labels" [n_b] (prompt indices in [0, U)) and "boxes" [n_b, 4]
            (normalised cx, cy, w, h).
        prompt_embeddings: [B, U, d] per image, or [U, d] shared by the batch.
        num_queries: Q, the number of matching queries that follow the dn queries.
        prompt_mask: [B, U] or [U] bool, True = valid prompt; label noise draws only valid ones.
            None means all prompts are valid.
        num_dn_queries: budget for dn queries (see above).
        label_noise_ratio: a slot's label is resampled with probability ``ratio * 0.5``.
        box_noise_scale: scale of the box jitter (0 disables it).
        generator: source of all randomness. Draws happen on the generator's device and are then
            moved to the embeddings' device, so any generator works; one on the embeddings'
            device (``StepGenerators.device``) avoids the copy.

    Returns:
        The `DenoisingQueries`, or None when the batch has no GT box at all.
    """
    num_gts = [len(t["labels"]) for t in targets]
    if max(num_gts, default=0) == 0:
        return None
    device = prompt_embeddings.device
    where = draw_on(generator, device)
    # random draws, in this order: the denoised subsets, label noise, box noise
    per_image_cap = max(1, num_dn_queries // 2)
    picked = [_denoised_subset(n, per_image_cap, generator, where, device) for n in num_gts]
    counts = [min(n, per_image_cap) for n in num_gts]
    max_gt = max(counts)
    if prompt_embeddings.dim() == 2:
        prompt_embeddings = prompt_embeddings.expand(len(targets), -1, -1)
    num_groups = max(1, num_dn_queries // (2 * max_gt))

    labels, boxes, negative = _slot_layout(targets, picked, counts, num_groups, device)
    valid = labels >= 0
    if label_noise_ratio > 0:
        labels = _noised_labels(labels, valid, prompt_mask, prompt_embeddings.shape[1],
                                label_noise_ratio, generator, where)
    if box_noise_scale > 0:
        boxes = _noised_boxes(boxes, negative, box_noise_scale, generator, where)

    reference_logits = torch.where(valid.unsqueeze(-1), inverse_sigmoid(boxes), 0.0)
    content = _slot_content(prompt_embeddings, labels, valid)
    meta = _denoising_meta(picked, counts, num_gts, num_groups, device)
    attn_mask = _cdn_attention_mask(meta.num_dn, num_queries, 2 * max_gt, device)
    return DenoisingQueries(content, reference_logits, labels, attn_mask, meta)


def _slot_layout(targets: list[dict[str, torch.Tensor]], picked: list[torch.Tensor | None],
                 counts: list[int], num_groups: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels [B, Nd], boxes [B, Nd, 4] float32 cxcywh, negative [B, Nd] bool) before noise.

    Per image its denoised GTs (``picked``, or all of them) padded to ``max(counts)`` (label -1,
    box 0), then laid out [B, groups, pos/neg, max_gt] and flattened to [B, Nd]. Built by
    concatenation (no in-place slice writes).
    """
    batch_size, max_gt = len(targets), max(counts)
    label_rows, box_rows = [], []
    for t, index, count in zip(targets, picked, counts):
        labels_b = t["labels"].to(device)
        boxes_b = t["boxes"].to(device=device, dtype=torch.float32)
        if index is not None:
            labels_b, boxes_b = labels_b[index], boxes_b[index]
        label_rows.append(torch.cat([labels_b, labels_b.new_full((max_gt - count,), -1)]))
        box_rows.append(torch.cat([boxes_b, boxes_b.new_zeros(max_gt - count, 4)]))
    shape = (batch_size, num_groups, 2, max_gt)
    labels = torch.stack(label_rows)[:, None, None].expand(shape).reshape(batch_size, -1)
    boxes = torch.stack(box_rows)[:, None, None].expand(shape + (4,)).reshape(batch_size, -1, 4)
    negative = (torch.arange(2, device=device) == 1)[None, None, :, None].expand(shape)
    return labels, boxes, negative.reshape(batch_size, -1)


def _noised_labels(labels: torch.Tensor, valid: torch.Tensor, prompt_mask: torch.Tensor | None,
                   num_prompts: int, ratio: float, generator: torch.Generator | None,
                   where: torch.device) -> torch.Tensor:
    """``labels`` [B, Nd] with each valid slot, with probability ``ratio * 0.5``, replaced by a
    prompt drawn uniformly among the image's valid ones (``prompt_mask``; None = all)."""
    batch_size, device = labels.shape[0], labels.device
    if prompt_mask is None:
        prompt_mask = torch.ones(num_prompts, dtype=torch.bool, device=device)
    prompt_mask = prompt_mask.to(device).expand(batch_size, num_prompts)
    # Stable sort puts each image's valid prompt indices first, so a uniform draw in
    # [0, num_valid) picks uniformly among them.
    valid_first = torch.argsort((~prompt_mask).int(), dim=1, stable=True)
    num_valid = prompt_mask.sum(dim=1, keepdim=True)
    flip = torch.rand(labels.shape, generator=generator, device=where).to(device)
    pick = torch.rand(labels.shape, generator=generator, device=where).to(device)
    pick = (pick * num_valid).long().clamp(max=num_prompts - 1)
    noised = valid_first.gather(1, pick)
    replace = (flip < ratio * 0.5) & valid & (num_valid > 0)
    return torch.where(replace, noised, labels)


def _noised_boxes(boxes: torch.Tensor, negative: torch.Tensor, scale: float,
                  generator: torch.Generator | None, where: torch.device) -> torch.Tensor:
    """``boxes`` [B, Nd, 4] cxcywh with DINO's corner jitter: ``sign * magnitude * half-size *
    scale`` on each xyxy coordinate, magnitude in [0, 1) for positives and [1, 2) for
    ``negative`` slots, then clamped to [0, 1]."""
    device = boxes.device
    half_size = boxes[..., 2:].repeat(1, 1, 2) / 2
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=where).to(device)
    magnitude = torch.rand(boxes.shape, generator=generator, device=where).to(device)
    magnitude = magnitude + negative.unsqueeze(-1).float()
    jitter = (sign * 2.0 - 1.0) * magnitude * half_size * scale
    return _xyxy_to_cxcywh((_cxcywh_to_xyxy(boxes) + jitter).clamp(min=0.0, max=1.0))


def _slot_content(prompt_embeddings: torch.Tensor, labels: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """[B, Nd, d]: the prompt embedding of each slot's label (a gather, so gradients reach the
    prompts); zeros for pad slots."""
    dim = prompt_embeddings.shape[2]
    gathered = prompt_embeddings.gather(1, labels.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim))
    return torch.where(valid.unsqueeze(-1), gathered, torch.zeros_like(gathered))


def _denoising_meta(picked: list[torch.Tensor | None], counts: list[int], num_gts: list[int],
                    num_groups: int, device: torch.device) -> DenoisingMeta:
    """The `DenoisingMeta` of the slot layout of `_slot_layout`: per image, its positive slots
    paired with their GT indices, and its negative slots, group after group."""
    max_gt = max(counts)
    group_start = torch.arange(num_groups, device=device).unsqueeze(1) * 2 * max_gt
    positive_pairs, negative_indices = [], []
    for index, count in zip(picked, counts):
        slot = torch.arange(count, device=device)
        gt_index = slot if index is None else index
        positive_pairs.append(((group_start + slot).flatten(), gt_index.repeat(num_groups)))
        negative_indices.append((group_start + max_gt + slot).flatten())
    return DenoisingMeta(num_groups * 2 * max_gt, num_groups, max_gt, positive_pairs,
                         negative_indices, denoised_boxes=sum(counts), total_boxes=sum(num_gts))


def _denoised_subset(num_boxes: int, cap: int, generator: torch.Generator | None,
                     where: torch.device, device: torch.device) -> torch.Tensor | None:
    """Indices of the ``cap`` GTs of an image that get dn queries (sorted, on ``device``), or
    None when all of them do (``num_boxes <= cap``)."""
    if num_boxes <= cap:
        return None
    order = torch.randperm(num_boxes, generator=generator, device=where)[:cap]
    return order.sort().values.to(device)


def _cdn_attention_mask(num_dn: int, num_queries: int, group_size: int,
                        device: torch.device) -> torch.Tensor:
    """[Nd + Q, Nd + Q] bool, True = blocked: matching queries never see dn queries and dn groups
    never see each other (DINO's ``prepare_for_cdn``)."""
    index = torch.arange(num_dn + num_queries, device=device)
    is_dn = index < num_dn
    group = torch.where(is_dn, index // group_size, -1)
    sees_dn = is_dn[None, :]
    other_group = group[:, None] != group[None, :]
    return sees_dn & (~is_dn[:, None] | other_group)


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
