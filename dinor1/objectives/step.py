"""One training step's objective: detection (SFT) loss, optionally + GRQO, as named terms.

Per batch (docs/method.md sections 1-3):

1. image features; one prompt per category of the batch, from its exemplars (chosen on the host
   with the step's host generator; only they go through the prompt encoder);
2. CDN queries from the GTs (labels are prompt indices; noise from the device generator; at most
   ``num_dn_queries`` of them however dense the images);
3. the forward pass; the matching cost of every decoder layer computed ONCE, vectorised, in fp32
   and outside the graph;
4. Hungarian matching per layer and image on that cost; detection loss for every decoder layer,
   the encoder proposals (in graph) and the CDN queries;
5. stage ``grqo``: rewards from the same cost (each query's best pair recomputed in the graph for
   the release form), advantages, KL against the frozen reference.

Device-to-host copies per step: the box counts and labels (once), the matching costs, the logs
(once, :func:`read_logs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dinor1.model.denoising import DenoisingQueries, build_denoising_queries
from dinor1.model.outputs import DinoR1Output
from dinor1.model.prompts import TrainingPrompts, assemble_training_prompts, pad_instances
from dinor1.model.randomness import StepGenerators, as_step_generators
from dinor1.model.wrapped import unwrap
from dinor1.objectives.contrastive import VisualTextContrastive, mean_instance_embeddings
from dinor1.objectives.detection import detection_loss, num_boxes_across_workers
from dinor1.objectives.grqo import grqo_loss
from dinor1.objectives.matcher import best_match_cost, hungarian_match, matching_cost
from dinor1.objectives.reference import ReferenceModel
from dinor1.objectives.settings import ObjectiveSettings
from dinor1.objectives.settings import objective_settings as objective_settings  # re-exported


def pad_targets(labels: list[torch.Tensor], boxes: list[torch.Tensor]):
    """Per-image targets -> gt_labels [B, G] (-1 padding), gt_boxes [B, G, 4], gt_mask [B, G]."""
    gt_boxes, gt_mask = pad_instances(boxes)
    gt_labels = torch.full(gt_mask.shape, -1, dtype=torch.long, device=gt_mask.device)
    if labels:  # the mask's row-major order is image by image, as the concatenation
        gt_labels[gt_mask] = torch.cat(labels).to(gt_mask.device)
    return gt_labels, gt_boxes, gt_mask


@dataclass
class _StepData:
    """One batch after the forward pass: its inputs, prompts, padded targets, CDN queries and
    the model's outputs."""

    pixels: torch.Tensor
    mask: torch.Tensor
    counts: list[int]  # boxes per image
    boxes: list[torch.Tensor]  # per image
    labels: list[torch.Tensor]  # per image, category ids
    prompts: TrainingPrompts
    gt_labels: torch.Tensor  # [B, G] prompt indices (-1 padding)
    gt_boxes: torch.Tensor  # [B, G, 4]
    gt_mask: torch.Tensor  # [B, G]
    dn: DenoisingQueries | None
    out: DinoR1Output


class TrainingObjective(nn.Module):
    """The model plus its training objective as ONE module, so that a DeepSpeed engine's single
    forward call covers the whole step.

    ZeRO-3 gathers a module's partitioned parameters only while that module's forward runs; the
    step also reads a few parameters directly (level embeddings, decoder query embeddings, the
    prompt encoder's content query), which are registered here as external parameters of this
    module so they are gathered for the whole step.
    """

    def __init__(self, net: nn.Module, class_text: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.net = net
        self._registered = False
        # the visual-text contrastive term: frozen class-name embeddings and the learnable
        # temperature (a parameter of this module, so the engine trains and saves it)
        self.class_text = class_text
        self.contrastive = VisualTextContrastive() if class_text is not None else None

    def register_for_zero3(self) -> None:
        import deepspeed

        core = self.net.gdino.model
        for param in (core.level_embed, core.query_position_embeddings.weight,
                      self.net.prompt_encoder.content.weight):
            deepspeed.zero.register_external_parameter(self, param)
        self._registered = True

    def forward(self, batch: dict[str, torch.Tensor], **kwargs):
        if self.contrastive is not None:
            kwargs.setdefault("class_text", self.class_text)
            kwargs.setdefault("contrastive", self.contrastive)
        loss, logs = training_losses(self.net, batch, **kwargs)
        device = batch["pixel_values"].device.type
        # 1 when the engine runs this forward under bf16 autocast (deepspeed.precision=bf16)
        logs["train/autocast_bf16"] = float(torch.is_autocast_enabled(device)
                                            and torch.get_autocast_dtype(device) == torch.bfloat16)
        return loss, logs


def training_losses(model, batch: dict[str, torch.Tensor], *, stage: str = "sft",
                    settings: ObjectiveSettings | None = None,
                    reference: ReferenceModel | None = None,
                    generators: StepGenerators | torch.Generator | None = None,
                    class_text: dict[int, torch.Tensor] | None = None,
                    contrastive: VisualTextContrastive | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its named terms for one batch from :class:`DetectionCollateFn`.

    Args:
        model: a DinoR1 (or a DeepSpeed engine around one).
        batch: ``pixel_values``, ``pixel_mask``, ``boxes``, ``class_labels``, ``num_boxes``.
        stage: ``"sft"`` (detection loss) or ``"grqo"`` (detection loss + GRQO term).
        settings: the objective's settings (:func:`objective_settings` builds them from a
            config); None = the defaults, ``ObjectiveSettings()``.
        reference: the frozen reference (required for ``grqo``).
        generators: the step's randomness (:func:`~dinor1.model.randomness.step_generators`):
            its host generator picks the prompt exemplars, its device generator draws the CDN
            noise. A plain CPU generator is accepted (a device one is seeded from it).
        class_text: {category id: [d] text embedding of its name} (frozen); with
            ``contrastive`` (which owns the learnable temperature) it adds the visual-text
            contrastive term. Off when either is None.

    Returns:
        (total loss, logs): the logs are Python floats, read from the device in one copy.
    """
    if stage not in ("sft", "grqo"):
        raise ValueError(f"stage must be 'sft' or 'grqo', got {stage!r}")
    if stage == "grqo" and reference is None:
        raise ValueError("stage 'grqo' needs a reference model")
    s = settings or ObjectiveSettings()
    with_contrastive = class_text is not None and contrastive is not None
    step = _forward(unwrap(model), batch, s, generators, with_contrastive)
    num_boxes = num_boxes_across_workers(step.gt_mask)
    cost, terms = _matched_terms(step, s, num_boxes)
    if step.dn is not None:
        terms.update(_denoising_terms(step, s, num_boxes))
    if with_contrastive:
        terms["contrastive"] = _contrastive_term(step, s, class_text, contrastive)
    logs: dict[str, torch.Tensor | float] = {}
    if stage == "grqo":
        terms["grqo"], logs = _grqo_term(step, s, reference, cost)
    total = torch.stack([t.float() for t in terms.values()]).sum()
    logs.update(_step_logs(step, terms, total))
    return total, read_logs(logs)


def _forward(net, batch: dict[str, torch.Tensor], s: ObjectiveSettings,
             generators: StepGenerators | torch.Generator | None,
             with_contrastive: bool) -> _StepData:
    """Prompts from the batch's exemplars, padded targets, CDN queries and the forward pass."""
    pixels, mask = batch["pixel_values"], batch["pixel_mask"]
    gens = as_step_generators(generators, pixels.device)
    batch_size = pixels.shape[0]
    # the only device-to-host copy before the matching: box counts and labels, for the host-side
    # index arithmetic (splitting, exemplar choice)
    host = torch.cat([batch["num_boxes"], batch["class_labels"]]).cpu()
    counts, host_labels = host[:batch_size].tolist(), host[batch_size:]
    boxes = list(batch["boxes"].split(counts))
    labels = list(batch["class_labels"].split(counts))
    features = net.image_features(pixels, mask)
    prompts = assemble_training_prompts(net, features, boxes, labels,
                                        exemplars_per_class=s.exemplars_per_class,
                                        generator=gens.host if gens else None,
                                        host_labels=host_labels,
                                        encode_all_instances=with_contrastive)
    embeddings = prompts.embeddings[None].expand(batch_size, -1, -1)
    gt_labels, gt_boxes, gt_mask = pad_targets(prompts.target_labels, boxes)
    dn = None
    if s.objectives.denoising:
        targets = [{"labels": t, "boxes": b} for t, b in zip(prompts.target_labels, boxes)]
        dn = build_denoising_queries(targets, embeddings, net.config.num_queries,
                                     num_dn_queries=net.settings.num_dn_queries,
                                     label_noise_ratio=net.settings.dn_label_noise,
                                     box_noise_scale=net.settings.dn_box_noise,
                                     generator=gens.device if gens else None)
    out = net(pixels, mask, net.visual_prompts(embeddings), features=features, denoising=dn)
    return _StepData(pixels, mask, counts, boxes, labels, prompts, gt_labels, gt_boxes, gt_mask,
                     dn, out)


def _named(prefix: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": value for name, value in parts.items()}


def _matched_terms(step: _StepData, s: ObjectiveSettings, num_boxes: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the decoder layers' [L, B, Q, G] matching cost, the detection terms of every decoder
    layer and of the encoder proposals, each on its Hungarian matching)."""
    out, gt_labels, gt_boxes, gt_mask = step.out, step.gt_labels, step.gt_boxes, step.gt_mask
    loss_kw, cost_kw = s.objectives.loss_weights(), s.objectives.matching_weights()
    # out of the graph: its intermediates grow with the boxes of an image (GRQO's
    # differentiable reward recomputes only each query's best pair, in _grqo_term)
    with torch.no_grad():
        cost = matching_cost(out.logits, out.boxes, gt_labels, gt_boxes, **cost_kw)
    matches = hungarian_match(cost.detach(), gt_mask)
    terms: dict[str, torch.Tensor] = {}
    for layer in range(out.logits.shape[0]):
        terms.update(_named(f"dec{layer}", detection_loss(
            out.logits[layer], out.boxes[layer], matches[layer], gt_labels, gt_boxes,
            out.prompt_mask, num_boxes, **loss_kw)))
    if s.objectives.encoder_loss:
        with torch.no_grad():
            enc_cost = matching_cost(out.encoder_logits, out.encoder_boxes, gt_labels, gt_boxes,
                                     **cost_kw)
        terms.update(_named("enc", detection_loss(
            out.encoder_logits, out.encoder_boxes, hungarian_match(enc_cost.detach(), gt_mask),
            gt_labels, gt_boxes, out.prompt_mask, num_boxes, **loss_kw)))
    return cost, terms


def _denoising_terms(step: _StepData, s: ObjectiveSettings, num_boxes: float
                     ) -> dict[str, torch.Tensor]:
    """The detection terms of the CDN queries of every decoder layer, on their own pairs."""
    out, dn = step.out, step.dn
    # normalised by the dn positives: every group's, of the boxes that were denoised
    dn_norm = num_boxes * dn.meta.num_groups * dn.meta.denoised_fraction
    terms: dict[str, torch.Tensor] = {}
    for layer in range(out.dn_logits.shape[0]):
        terms.update(_named(f"dn{layer}", detection_loss(
            out.dn_logits[layer], out.dn_boxes[layer], dn.meta.positive_pairs, step.gt_labels,
            step.gt_boxes, out.prompt_mask, dn_norm, **s.objectives.loss_weights())))
    return terms


def _contrastive_term(step: _StepData, s: ObjectiveSettings,
                      class_text: dict[int, torch.Tensor],
                      contrastive: VisualTextContrastive) -> torch.Tensor:
    """The weighted visual-text contrastive loss of the batch's categories."""
    prompts = step.prompts
    categories = prompts.category_ids.tolist()
    visual = mean_instance_embeddings(prompts.instance_embeddings, prompts.instance_mask,
                                      step.labels, prompts.category_ids)
    text = torch.stack([class_text[c] for c in categories]).to(visual)
    return s.objectives.contrastive_weight * contrastive(visual, text.detach())


def _grqo_term(step: _StepData, s: ObjectiveSettings, reference: ReferenceModel,
               cost: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """GRQO's term and diagnostics (:func:`grqo_loss`), its rewards from ``cost``."""
    out, g = step.out, s.grqo
    num_queries = out.logits.shape[2]
    muted = g.muted_queries(num_queries)
    if muted >= num_queries:  # (objective_settings refuses it earlier, naming the key)
        raise ValueError(f"GRQO mutes {muted} of {num_queries} queries: every advantage would "
                         f"be 0")
    if g.pg_score not in ("decoder", "objectness"):
        raise ValueError(f"grqo pg_score must be 'decoder' or 'objectness', got {g.pg_score!r}")
    ref = reference.objectness(step.pixels, step.mask, step.boxes, step.prompts.layout,
                               out.selected_indices)
    scores = out.logits.max(-1).values if g.pg_score == "decoder" else out.objectness
    # the reward -min_j C_qj, as a [L, B, Q, 1] cost against each query's best GT; in the
    # graph for the release form (the same value and gradient as the full minimum)
    with torch.set_grad_enabled(g.form == "release" and torch.is_grad_enabled()):
        best = best_match_cost(cost, step.gt_mask, out.logits, out.boxes, step.gt_labels,
                               step.gt_boxes, **s.objectives.matching_weights())
    return grqo_loss(best[..., None], step.gt_mask.any(-1, keepdim=True), out.objectness, ref,
                     form=g.form, alpha=g.alpha, beta=g.beta, num_mute=muted, scores=scores)


def _step_logs(step: _StepData, terms: dict[str, torch.Tensor], total: torch.Tensor
               ) -> dict[str, torch.Tensor | float]:
    """The named loss terms, the total and the batch's counts."""
    logs: dict[str, torch.Tensor | float] = {f"loss/{k}": v for k, v in terms.items()}
    logs["loss/total"] = total
    logs["data/num_prompts"] = float(step.prompts.embeddings.shape[0])
    logs["data/num_boxes"] = float(sum(step.counts))
    num_queries = step.out.logits.shape[2]
    # boxes beyond the query count cannot all be matched (Hungarian matches min(Q, n_b))
    logs["data/unmatched_boxes"] = float(sum(max(0, n - num_queries) for n in step.counts))
    if step.dn is not None:
        logs["dn/queries"] = float(step.dn.meta.num_dn)
        logs["dn/denoised_fraction"] = step.dn.meta.denoised_fraction
    return logs


def read_logs(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Logs with tensor values -> Python floats, with ONE device-to-host copy for all of them
    (a ``float()`` per value is a synchronisation each on a GPU)."""
    names = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    if names:
        values = torch.stack([logs[k].detach().float().reshape(()) for k in names]).tolist()
        logs = {**logs, **dict(zip(names, values))}
    return {k: float(v) for k, v in logs.items()}
