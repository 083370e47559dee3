"""Which visual prompts a batch uses: training assembly and "generic" prompts for evaluation.

Training (docs/method.md section 1): every ground-truth instance of the per-worker batch is encoded by
the visual prompt encoder; for each category present in the batch, ``exemplars_per_class``
random instances (from any image of the batch) are averaged into that category's prompt. Every
image gets the same U prompts; a category absent from an image is a negative for it.

Evaluation ("generic" mode): N support instances per class are encoded and averaged per class
into a [C, d] tensor that is saved (safetensors + the class list) and used as the prompts for
every test image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class TrainingPrompts:
    """The prompts of one batch.

    ``U`` categories present in the batch, ``K`` exemplars per category, ``E`` the most exemplar
    instances in one image (at most U * K however many boxes an image has), ``P`` the most
    instances in one image.
    """

    embeddings: torch.Tensor  # [U, d] one prompt per category (mean of its exemplars)
    category_ids: torch.Tensor  # [U] dataset category id of each prompt (host)
    exemplars: torch.Tensor  # [U, K, 2] (image, instance) of each exemplar; -1 = unused (host)
    target_labels: list[torch.Tensor]  # per image: prompt index of each GT box (its device)
    layout: ExemplarLayout | None = None  # the exemplars in the prompt encoder's input
    # every GT instance encoded, only when asked for (the visual-text contrastive loss needs
    # them; prompts alone need just the exemplars)
    instance_embeddings: torch.Tensor | None = None  # [B, P, d]
    instance_mask: torch.Tensor | None = None  # [B, P] bool


def pad_instances(boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [n_b, 4] boxes -> padded [B, P, 4] and mask [B, P] (P >= 1).

    Padding slots hold a harmless dummy box (0.5, 0.5, 0.1, 0.1). Built by concatenation on the
    boxes' device (no host round trip per image).
    """
    most = max([1] + [len(b) for b in boxes])
    device = boxes[0].device if boxes else torch.device("cpu")
    dummy = torch.tensor([0.5, 0.5, 0.1, 0.1], device=device)
    padded = torch.stack([torch.cat([b.to(dummy.dtype), dummy.expand(most - len(b), 4)])
                          for b in boxes]) if boxes else torch.zeros(0, most, 4)
    counts = torch.tensor([len(b) for b in boxes], device=device)
    mask = torch.arange(most, device=device)[None, :] < counts[:, None]
    return padded, mask


def choose_exemplars(labels: torch.Tensor, counts: list[int], exemplars_per_class: int,
                     generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick ``exemplars_per_class`` random instances of every category of the batch (host side).

    Args:
        labels: [N] category ids of the batch's instances, image by image (CPU).
        counts: instances per image (sum N).
        exemplars_per_class: K (fewer where a category has fewer instances).
        generator: a CPU generator (``StepGenerators.host``).

    Returns:
        (categories [U] sorted, exemplars [U, K, 2] (image, instance) with -1 in unused slots,
        prompt index [N] of every instance), all on the CPU.
    """
    labels = labels.cpu().long()
    categories, prompt_index = torch.unique(labels, sorted=True, return_inverse=True)
    image = torch.repeat_interleave(torch.arange(len(counts)),
                                    torch.tensor(counts, dtype=torch.long))
    starts = torch.tensor([0] + counts[:-1], dtype=torch.long).cumsum(0)
    instance = torch.arange(len(labels)) - starts[image] if len(labels) else image
    # a random order within each category: shuffle, then a stable sort by category
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.argsort(prompt_index[order], stable=True)]
    first = torch.searchsorted(prompt_index[order], torch.arange(len(categories)))
    rank = torch.arange(len(labels)) - first[prompt_index[order]]
    take = order[rank < exemplars_per_class]
    slot = rank[rank < exemplars_per_class]
    chosen = torch.full((len(categories), exemplars_per_class, 2), -1, dtype=torch.long)
    chosen[prompt_index[take], slot] = torch.stack([image[take], instance[take]], 1)
    return categories, chosen, prompt_index


@dataclass
class ExemplarLayout:
    """Where the exemplars sit in the small batch of boxes the prompt encoder sees (host side).

    ``W`` = the most exemplar instances in one image (at most U * K, however many boxes it has).
    """

    exemplars: torch.Tensor  # [U, K, 2] (image, instance), -1 = unused
    box_index: torch.Tensor  # [B, W] index into the batch's concatenated boxes; N = padding
    box_mask: torch.Tensor  # [B, W] bool, True on real exemplar slots
    slots: torch.Tensor  # [U, K, 2] (image, slot in box_index), -1 = unused

    @classmethod
    def of(cls, exemplars: torch.Tensor, counts: list[int]) -> ExemplarLayout:
        """The layout of ``exemplars`` [U, K, 2] in a batch with ``counts`` boxes per image."""
        exemplars = exemplars.cpu()
        batch, total = len(counts), sum(counts)
        used = exemplars[..., 0] >= 0
        pairs = torch.unique(exemplars[used], dim=0)  # [E, 2] sorted by image, instance
        per_image = torch.bincount(pairs[:, 0], minlength=batch)
        width = max([1] + per_image.tolist())
        starts = torch.cat([torch.zeros(1, dtype=torch.long), per_image.cumsum(0)[:-1]])
        slot = torch.arange(len(pairs)) - starts[pairs[:, 0]]
        offsets = torch.tensor([0] + counts[:-1], dtype=torch.long).cumsum(0)
        box_index = torch.full((batch, width), total, dtype=torch.long)
        box_index[pairs[:, 0], slot] = offsets[pairs[:, 0]] + pairs[:, 1]
        lookup = torch.full((batch, max([1] + counts)), -1, dtype=torch.long)
        lookup[pairs[:, 0], pairs[:, 1]] = slot
        slots = exemplars.clone()
        slots[used, 1] = lookup[exemplars[used][:, 0], exemplars[used][:, 1]]
        return cls(exemplars, box_index, box_index < total, slots)


def encode_exemplars(model, features, boxes: list[torch.Tensor],
                     layout: ExemplarLayout | torch.Tensor) -> torch.Tensor:
    """Encode only the exemplar instances and average them into one prompt per category.

    The prompt encoder's cost then grows with the number of exemplars (at most U * K per batch),
    not with the number of boxes per image (100-300 on dense data). Each prompt only attends to
    itself inside the encoder, so this equals encoding every box and picking the exemplars.

    Args:
        model: a :class:`~dinor1.model.dino_r1.DinoR1` (the policy or the frozen reference).
        features: ``model.image_features(...)`` of the batch.
        boxes: per image [n_b, 4] normalised cx, cy, w, h (on the features' device).
        layout: an :class:`ExemplarLayout`, or the exemplars [U, K, 2] to lay out here.

    Returns:
        [U, d] prompt embeddings.
    """
    if not isinstance(layout, ExemplarLayout):
        layout = ExemplarLayout.of(layout, [len(b) for b in boxes])
    device = features.source.device
    flat = torch.cat(boxes) if boxes else torch.zeros(0, 4, device=device)
    flat = torch.cat([flat, flat.new_tensor([[0.5, 0.5, 0.1, 0.1]])])  # index N: padding
    encoded = model.encode_boxes(features, flat[layout.box_index.to(device)],
                                 layout.box_mask.to(device))
    return prompts_from_exemplars(encoded, layout.slots)


def assemble_training_prompts(model, features, boxes: list[torch.Tensor],
                              labels: list[torch.Tensor], *, exemplars_per_class: int = 1,
                              generator: torch.Generator | None = None,
                              host_labels: torch.Tensor | None = None,
                              encode_all_instances: bool = False) -> TrainingPrompts:
    """Pick the per-category exemplars and encode them into the batch's prompts.

    Args:
        model: a :class:`~dinor1.model.dino_r1.DinoR1`.
        features: ``model.image_features(...)`` of this batch.
        boxes: per image [n_b, 4] normalised cx, cy, w, h.
        labels: per image [n_b] dataset category ids (on the batch's device).
        exemplars_per_class: K instances averaged into each prompt (fewer if a class has fewer).
        generator: randomness of the exemplar choice: a CPU generator
            (``StepGenerators.host``); the choice is index arithmetic on the host.
        host_labels: the same labels concatenated, already on the CPU (saves a device-to-host
            copy when the caller has them).
        encode_all_instances: also encode every GT instance (``instance_embeddings``, for the
            visual-text contrastive loss). Off, the prompt encoder sees only the exemplars.
    """
    counts = [len(lab) for lab in labels]
    if host_labels is None:
        host_labels = torch.cat(labels).cpu() if labels else torch.zeros(0, dtype=torch.long)
    categories, chosen, prompt_index = choose_exemplars(host_labels, counts,
                                                        exemplars_per_class, generator)
    device = labels[0].device if labels else torch.device("cpu")
    target_labels = list(prompt_index.to(device, non_blocking=True).split(counts))
    instances = mask = None
    layout = ExemplarLayout.of(chosen, counts)
    if encode_all_instances:
        padded, mask = pad_instances(boxes)
        instances = model.encode_boxes(features, padded, mask)  # [B, P, d]
        embeddings = prompts_from_exemplars(instances, chosen)
    else:
        embeddings = encode_exemplars(model, features, boxes, layout)
    return TrainingPrompts(embeddings=embeddings, category_ids=categories, exemplars=chosen,
                           target_labels=target_labels, layout=layout,
                           instance_embeddings=instances, instance_mask=mask)


def prompts_from_exemplars(instances: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
    """Average the chosen instance embeddings into one prompt per category.

    Args:
        instances: [B, P, d] encoded GT instances.
        exemplars: [U, K, 2] (image, instance) per exemplar, -1 for unused slots.

    Returns:
        [U, d]. The GRQO reference re-encodes the same exemplars with its own weights.
    """
    used = exemplars[..., 0] >= 0  # [U, K]
    index = exemplars.clamp(min=0).to(instances.device)
    picked = instances[index[..., 0], index[..., 1]]  # [U, K, d]
    weights = used.to(instances.device, instances.dtype)[..., None]
    return (picked * weights).sum(1) / weights.sum(1).clamp(min=1)


@dataclass
class GenericPrompts:
    """Per-class prompt embeddings for evaluation, with the classes they stand for."""

    embeddings: torch.Tensor  # [C, d]
    category_ids: list[int]
    names: list[str]
    counts: list[int]  # support instances averaged per class

    def save(self, path: str | Path) -> None:
        metadata = {"category_ids": json.dumps(self.category_ids),
                    "names": json.dumps(self.names), "counts": json.dumps(self.counts)}
        save_file({"embeddings": self.embeddings.detach().cpu().contiguous()}, str(path),
                  metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> GenericPrompts:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        return cls(embeddings=load_file(str(path))["embeddings"],
                   category_ids=json.loads(metadata["category_ids"]),
                   names=json.loads(metadata["names"]), counts=json.loads(metadata["counts"]))


@torch.no_grad()
def build_generic_prompts(model, batches, categories: dict[int, str], *,
                          per_class: int = 16, allow_missing: bool = False) -> GenericPrompts:
    """Average the prompt embeddings of up to ``per_class`` support instances per class.

    Args:
        model: a :class:`~dinor1.model.dino_r1.DinoR1` (put in eval mode by the caller).
        batches: iterable of collated batches (``pixel_values``, ``pixel_mask``, ``boxes``,
            ``class_labels``, ``num_boxes``) from the support split.
        categories: {category id: name} of the classes wanted.
        allow_missing: leave out classes the support split lacks (they get no prompt, so no
            detections) instead of raising.
    """
    sums: dict[int, torch.Tensor] = {}
    counts = {c: 0 for c in categories}
    for batch in batches:
        if all(n >= per_class for n in counts.values()):
            break
        split = batch["num_boxes"].tolist()
        boxes, labels = batch["boxes"].split(split), batch["class_labels"].split(split)
        features = model.image_features(batch["pixel_values"], batch["pixel_mask"])
        padded, mask = pad_instances(list(boxes))
        encoded = model.encode_boxes(features, padded, mask)
        for b, lab in enumerate(labels):
            for i, category in enumerate(lab.tolist()):
                if category in counts and counts[category] < per_class:
                    sums[category] = sums.get(category, 0) + encoded[b, i].float().cpu()
                    counts[category] += 1
    missing = [c for c, n in counts.items() if n == 0]
    if missing and not allow_missing:
        raise ValueError(f"support split has no instance of categories {missing[:10]}")
    ids = sorted(c for c in categories if counts[c])
    if not ids:
        raise ValueError("support split has no instance of any wanted category")
    return GenericPrompts(embeddings=torch.stack([sums[c] / counts[c] for c in ids]),
                          category_ids=ids, names=[categories[c] for c in ids],
                          counts=[counts[c] for c in ids])
