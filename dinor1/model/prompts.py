"""Which visual prompts a batch uses: training assembly and "generic" prompts for evaluation.

Training (METHOD.md section 1): every ground-truth instance of the per-worker batch is encoded by
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

    ``U`` categories present in the batch, ``P`` the most instances in one image.
    """

    embeddings: torch.Tensor  # [U, d] one prompt per category (mean of its exemplars)
    category_ids: torch.Tensor  # [U] dataset category id of each prompt
    instance_embeddings: torch.Tensor  # [B, P, d] every GT instance, encoded
    instance_mask: torch.Tensor  # [B, P] bool
    exemplars: torch.Tensor  # [U, K, 2] (image, instance) of each exemplar; -1 = unused slot
    target_labels: list[torch.Tensor]  # per image: prompt index of each GT box


def pad_instances(boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [n_b, 4] boxes -> padded [B, P, 4] and mask [B, P] (P >= 1)."""
    most = max([1] + [len(b) for b in boxes])
    padded = torch.zeros(len(boxes), most, 4)
    mask = torch.zeros(len(boxes), most, dtype=torch.bool)
    for i, b in enumerate(boxes):
        padded[i, : len(b)] = b
        mask[i, : len(b)] = True
    if boxes:
        padded, mask = padded.to(boxes[0].device), mask.to(boxes[0].device)
    padded[~mask] = torch.tensor([0.5, 0.5, 0.1, 0.1], device=padded.device)  # harmless dummy
    return padded, mask


def assemble_training_prompts(model, features, boxes: list[torch.Tensor],
                              labels: list[torch.Tensor], *, exemplars_per_class: int = 1,
                              generator: torch.Generator | None = None) -> TrainingPrompts:
    """Encode the batch's GT instances and pick the per-category prompts.

    Args:
        model: a :class:`~dinor1.model.dino_r1.DinoR1`.
        features: ``model.image_features(...)`` of this batch.
        boxes: per image [n_b, 4] normalised cx, cy, w, h.
        labels: per image [n_b] dataset category ids.
        exemplars_per_class: K instances averaged into each prompt (fewer if a class has fewer).
        generator: randomness of the exemplar choice (CPU generator).
    """
    padded, mask = pad_instances(boxes)
    instances = model.encode_boxes(features, padded, mask)  # [B, P, d]
    flat_labels = torch.cat([lab.cpu() for lab in labels]) if labels else torch.zeros(0)
    where = [(b, i) for b, lab in enumerate(labels) for i in range(len(lab))]
    categories = torch.unique(flat_labels).long()
    chosen = torch.full((len(categories), exemplars_per_class, 2), -1, dtype=torch.long)
    for u, category in enumerate(categories.tolist()):
        members = (flat_labels == category).nonzero().flatten()
        order = torch.randperm(len(members), generator=generator)[:exemplars_per_class]
        chosen[u, : len(order)] = torch.tensor([where[int(members[j])] for j in order])
    embeddings = prompts_from_exemplars(instances, chosen)
    index = {c: u for u, c in enumerate(categories.tolist())}
    target_labels = [torch.tensor([index[int(c)] for c in lab.tolist()], dtype=torch.long,
                                  device=lab.device) for lab in labels]
    return TrainingPrompts(embeddings=embeddings, category_ids=categories,
                           instance_embeddings=instances, instance_mask=mask, exemplars=chosen,
                           target_labels=target_labels)


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
