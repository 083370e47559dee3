"""DINO-R1: Grounding DINO from `transformers` plus a visual prompt encoder, visual-guided query
selection, prompt classification heads and contrastive denoising (docs/method.md section 1).

The backbone, input projections, feature enhancer, decoder layers, box heads and the text path
are `transformers`' own (``GroundingDinoForObjectDetection``, held as ``self.gdino`` so its
pretrained checkpoints load unchanged). This module re-runs its forward pass step by step so the
"text" stream can carry visual prompts and the decoder can take denoising queries.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection
from transformers.models.grounding_dino.modeling_grounding_dino import (
    encode_sinusoidal_position_embedding,
    generate_masks_with_special_tokens_and_transfer_map,
)

from dinor1.model.outputs import DinoR1Output, ImageFeatures, PromptInputs, ReferenceOutput
from dinor1.model.presets import PRESETS, preset_config
from dinor1.model.query_selection import PromptClassifier, select_queries_by_prompts

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DinoR1Settings:
    """What DINO-R1 adds on top of the Grounding DINO config."""

    prompt_encoder_heads: int = 8
    prompt_encoder_points: int = 4
    prompt_encoder_ffn_dim: int = 2048
    prior_prob: float = 0.01
    num_dn_queries: int = 100
    dn_label_noise: float = 0.5
    dn_box_noise: float = 1.0


class DinoR1(nn.Module):
    """Grounding DINO with visual prompts.

    Args:
        config: the Grounding DINO config (backbone, d_model, layers, queries, text encoder).
        settings: DINO-R1's additions.
    """

    def __init__(self, config: GroundingDinoConfig, settings: DinoR1Settings | None = None):
        super().__init__()
        from dinor1.model.prompt_encoder import VisualPromptEncoder

        self.config = config
        self.settings = settings or DinoR1Settings()
        self.gdino = GroundingDinoForObjectDetection(config)
        self.prompt_encoder = VisualPromptEncoder(
            config, num_heads=self.settings.prompt_encoder_heads,
            num_points=self.settings.prompt_encoder_points,
            ffn_dim=self.settings.prompt_encoder_ffn_dim)
        self.prompt_classifier = PromptClassifier(
            config.d_model, config.decoder_layers + 1, self.settings.prior_prob)
        self.channels_last = False  # NHWC pixels into the backbone (model/compile.py)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        # transformers' Swin keeps a final LayerNorm that Grounding DINO never uses (it reads the
        # stage outputs); frozen so optimisers and ZeRO don't carry a parameter with no gradient
        for name, param in self.gdino.named_parameters():
            if ".swin.layernorm." in name:
                param.requires_grad_(False)

    @property
    def core(self):
        return self.gdino.model

    # ----------------------------------------------------------------------------- image side
    def reference_unused_modules(self) -> list[nn.Module]:
        """Submodules :meth:`reference_forward` never runs (the text encoder: prompts are visual;
        the decoder: it stops at query selection). A frozen reference may drop their weights."""
        return [self.gdino.model.text_backbone, self.gdino.model.decoder]

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                       ) -> ImageFeatures:
        """Backbone + input projections, flattened (the features the VPE and enhancer read).

        Args:
            pixel_values: [B, 3, H, W]; pixel_mask: [B, H, W] (1 on real pixels).
        """
        core = self.core
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:],
                                    dtype=torch.long, device=pixel_values.device)
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        vision_features, positions = core.backbone(pixel_values, pixel_mask)
        maps, masks = [], []
        for level, (source, mask) in enumerate(vision_features):
            maps.append(core.input_proj_vision[level](source))
            masks.append(mask)
        for level in range(len(maps), self.config.num_feature_levels):
            source = core.input_proj_vision[level](
                vision_features[-1][0] if level == len(vision_features) else maps[-1])
            mask = nn.functional.interpolate(pixel_mask[None].float(), size=source.shape[-2:]
                                             ).to(torch.bool)[0]
            positions.append(core.backbone.position_embedding(source, mask).to(source.dtype))
            maps.append(source)
            masks.append(mask)
        sources, valids, pos, shapes = [], [], [], []
        for level, (source, mask, pos_embed) in enumerate(zip(maps, masks, positions)):
            shapes.append(tuple(source.shape[-2:]))
            sources.append(source.flatten(2).transpose(1, 2))
            valids.append(mask.flatten(1))
            pos.append(pos_embed.flatten(2).transpose(1, 2) + core.level_embed[level].view(1, 1, -1))
        source = torch.cat(sources, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=source.device)
        return ImageFeatures(
            source=source,
            valid=torch.cat(valids, 1),
            position=torch.cat(pos, 1),
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=shapes,
            level_start_index=torch.cat((spatial_shapes.new_zeros((1,)),
                                         spatial_shapes.prod(1).cumsum(0)[:-1])),
            valid_ratios=torch.stack([core.get_valid_ratio(m, dtype=source.dtype) for m in masks],
                                     1),
        )

    # ---------------------------------------------------------------------------- prompt side
    def encode_boxes(self, features: ImageFeatures, boxes: torch.Tensor,
                     box_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Visual prompt embeddings of boxes in each image: [B, P, 4] -> [B, P, d]."""
        return self.prompt_encoder(boxes, features.source, ~features.valid, features.spatial_shapes,
                                   features.spatial_shapes_list, features.level_start_index,
                                   features.valid_ratios, box_mask)

    @staticmethod
    def visual_prompts(embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> PromptInputs:
        """Prompt inputs from visual prompt embeddings [B, U, d] (or [U, d] for every image)."""
        batch, count = embeddings.shape[:2]
        if mask is None:
            mask = torch.ones(batch, count, dtype=torch.bool, device=embeddings.device)
        # (a comparison, not torch.eye: onnxruntime has no boolean EyeLike for an exported graph)
        index = torch.arange(count, device=embeddings.device)
        eye = index[:, None] == index[None, :]
        return PromptInputs(embeddings=embeddings, mask=mask,
                            self_attention=eye.expand(batch, count, count),
                            position_ids=torch.zeros(batch, count, dtype=torch.long,
                                                     device=embeddings.device),
                            kind="visual")

    def text_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     token_type_ids: torch.Tensor | None = None) -> PromptInputs:
        """Prompt inputs from tokenised text, exactly as Grounding DINO builds them."""
        core = self.core
        self_attention, position_ids = generate_masks_with_special_tokens_and_transfer_map(
            input_ids, special_tokens=core.special_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        limit = self.config.max_text_len
        self_attention, position_ids = self_attention[:, :limit, :limit], position_ids[:, :limit]
        input_ids, token_type_ids = input_ids[:, :limit], token_type_ids[:, :limit]
        attention_mask = attention_mask[:, :limit]
        text = core.text_backbone(input_ids, self_attention[:, None], token_type_ids, position_ids,
                                  return_dict=True).last_hidden_state
        return PromptInputs(embeddings=core.text_projection(text), mask=attention_mask.bool(),
                            self_attention=self_attention, position_ids=position_ids, kind="text")

    # ------------------------------------------------------------------------------- forward
    def encode(self, features: ImageFeatures, prompts: PromptInputs):
        """Feature enhancer (the Grounding DINO encoder) over image tokens and prompts."""
        out = self.core.encoder(
            vision_features=features.source,
            vision_attention_mask=~features.valid,
            vision_position_embedding=features.position,
            spatial_shapes=features.spatial_shapes,
            spatial_shapes_list=features.spatial_shapes_list,
            level_start_index=features.level_start_index,
            valid_ratios=features.valid_ratios,
            text_features=prompts.embeddings,
            text_attention_mask=~prompts.mask,
            text_position_embedding=None,
            text_self_attention_masks=~prompts.self_attention,
            text_position_ids=prompts.position_ids,
            return_dict=True,
        )
        return out.last_hidden_state_vision, out.last_hidden_state_text

    def classify(self, queries: torch.Tensor, prompts: torch.Tensor, prompt_inputs: PromptInputs,
                 layer: int) -> torch.Tensor:
        """[B, N, d] x [B, U, d] -> [B, N, U]; layer 0 = encoder proposals, 1..L decoder."""
        if prompt_inputs.kind == "text":
            head = (self.core.encoder_output_class_embed if layer == 0
                    else self.gdino.class_embed[layer - 1])
            logits = head(queries, prompts, prompt_inputs.mask)
            return logits[..., : prompts.shape[1]]
        return self.prompt_classifier(queries, prompts, prompt_inputs.mask, layer)

    def proposals(self, features: ImageFeatures, memory: torch.Tensor, prompts: torch.Tensor,
                  prompt_inputs: PromptInputs):
        """Per-token proposal queries, logits [B, S, U] and box logits [B, S, 4]."""
        core = self.core
        object_query, anchors = core.generate_encoder_output_proposals(
            memory, ~features.valid, features.spatial_shapes_list)
        logits = self.classify(object_query, prompts, prompt_inputs, layer=0)
        box_logits = core.encoder_output_bbox_embed(object_query) + anchors
        if prompt_inputs.kind == "visual":  # never select padding or off-image anchors
            logits = logits.masked_fill(~torch.isfinite(anchors).all(-1, keepdim=True),
                                        float("-inf"))
        return object_query, logits, box_logits

    def reference_forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None,
                          prompt_embeddings: torch.Tensor | None = None,
                          prompt_mask: torch.Tensor | None = None, *,
                          prompt_boxes: torch.Tensor | None = None,
                          prompt_box_mask: torch.Tensor | None = None,
                          features: ImageFeatures | None = None) -> ReferenceOutput:
        """Forward only as far as query selection (GRQO's frozen reference needs no decoder).

        Prompts are either given as embeddings [B, U, d], or as boxes to encode with this
        model's own prompt encoder (``prompt_boxes`` [B, U, 4], one box per prompt per image).
        """
        if features is None:
            features = self.image_features(pixel_values, pixel_mask)
        if prompt_embeddings is None:
            prompt_embeddings = self.encode_boxes(features, prompt_boxes, prompt_box_mask)
            prompt_mask = prompt_box_mask
        prompt_inputs = self.visual_prompts(prompt_embeddings, prompt_mask)
        memory, prompts = self.encode(features, prompt_inputs)
        _, token_logits, _ = self.proposals(features, memory, prompts, prompt_inputs)
        objectness = token_logits.max(-1).values
        return ReferenceOutput(
            token_objectness=objectness,
            selected_indices=torch.topk(objectness, self.config.num_queries, dim=1).indices)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None,
                prompt_inputs: PromptInputs, *, features: ImageFeatures | None = None,
                denoising=None) -> DinoR1Output:
        """Detect the prompted categories.

        Args:
            pixel_values: [B, 3, H, W]; pixel_mask: [B, H, W].
            prompt_inputs: from :meth:`visual_prompts` or :meth:`text_prompts`.
            features: precomputed :meth:`image_features` (e.g. already used to encode prompts).
            denoising: a :class:`~dinor1.model.denoising.DenoisingQueries` (training only).
        """
        if features is None:
            features = self.image_features(pixel_values, pixel_mask)
        memory, prompts = self.encode(features, prompt_inputs)
        object_query, token_logits, token_box_logits = self.proposals(
            features, memory, prompts, prompt_inputs)
        selected = select_queries_by_prompts(token_logits, self.config.num_queries)
        gather4 = selected[..., None].expand(-1, -1, 4)
        selected_box_logits = token_box_logits.gather(1, gather4)
        encoder_logits = token_logits.gather(
            1, selected[..., None].expand(-1, -1, token_logits.shape[-1]))
        batch = pixel_values.shape[0]
        target = self.core.query_position_embeddings.weight[None].expand(batch, -1, -1)
        reference = selected_box_logits.detach().sigmoid()
        num_dn = 0
        self_attn_mask = None
        if denoising is not None:
            num_dn = denoising.content.shape[1]
            target = torch.cat([denoising.content, target], 1)
            reference = torch.cat([denoising.reference_logits.sigmoid(), reference], 1)
            blocked = denoising.attn_mask.to(memory.device)
            self_attn_mask = torch.zeros(blocked.shape, dtype=memory.dtype, device=memory.device)
            self_attn_mask = self_attn_mask.masked_fill(blocked, torch.finfo(memory.dtype).min)
        hidden, references = self._decode(target, reference, memory, prompts, prompt_inputs,
                                          features, self_attn_mask)
        logits, boxes = [], []
        for layer in range(len(hidden)):
            logits.append(self.classify(hidden[layer], prompts, prompt_inputs, layer + 1))
            delta = self.gdino.bbox_embed[layer](hidden[layer])
            boxes.append((delta + torch.special.logit(references[layer], eps=1e-5)).sigmoid())
        logits, boxes = torch.stack(logits), torch.stack(boxes)
        return DinoR1Output(
            logits=logits[:, :, num_dn:],
            boxes=boxes[:, :, num_dn:],
            encoder_logits=encoder_logits,
            encoder_boxes=selected_box_logits.sigmoid(),
            selected_indices=selected,
            objectness=encoder_logits.max(-1).values,
            prompt_mask=prompt_inputs.mask,
            prompts=prompts,
            dn_logits=logits[:, :, :num_dn] if num_dn else None,
            dn_boxes=boxes[:, :, :num_dn] if num_dn else None,
            dn_meta=denoising.meta if denoising is not None else None,
        )

    def _decode(self, target, reference, memory, prompts, prompt_inputs, features,
                self_attn_mask):
        """Grounding DINO's decoder loop (its layers and heads), for any number of queries.

        Returns per layer the normed hidden states [B, N, d] and the reference boxes each layer
        started from [B, N, 4] (what its box deltas are added to).
        """
        decoder = self.core.decoder
        text_mask = (~prompt_inputs.mask)[:, None, None, :].to(memory.dtype)
        text_mask = text_mask * torch.finfo(memory.dtype).min
        ratios = torch.cat([features.valid_ratios, features.valid_ratios], -1)[:, None]
        hidden_states, hidden, starts = target, [], []
        for idx, layer in enumerate(decoder.layers):
            reference_input = reference[:, :, None] * ratios
            query_pos = decoder.reference_points_head(encode_sinusoidal_position_embedding(
                reference_input[:, :, 0, :], num_pos_feats=self.config.d_model // 2))
            hidden_states = layer(
                hidden_states=hidden_states,
                position_embeddings=query_pos,
                reference_points=reference_input,
                spatial_shapes=features.spatial_shapes,
                spatial_shapes_list=features.spatial_shapes_list,
                level_start_index=features.level_start_index,
                vision_encoder_hidden_states=memory,
                vision_encoder_attention_mask=features.valid,
                text_encoder_hidden_states=prompts,
                text_encoder_attention_mask=text_mask,
                self_attn_mask=self_attn_mask,
            )[0]
            starts.append(reference)
            delta = decoder.bbox_embed[idx](hidden_states)
            reference = (delta + torch.special.logit(reference, eps=1e-5)).sigmoid().detach()
            hidden.append(decoder.layer_norm(hidden_states))
        return hidden, starts

    # ------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """``config.json`` + ``model.safetensors`` (no pickle). ``state_dict`` overrides the
        module's own tensors (e.g. a full copy gathered from ZeRO-3 partitions)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"architecture": "dinor1", "dino_r1": asdict(self.settings),
                   "grounding_dino": self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=1))
        save_weights(self, directory / WEIGHTS_NAME, state_dict)

    @classmethod
    def from_pretrained(cls, name_or_path: str, settings: DinoR1Settings | None = None
                        ) -> DinoR1:
        """A preset name (random init), a directory saved by :meth:`save_pretrained` (local, or
        an object-store URI such as ``s3://bucket/runs/x/final_model``), or any Hugging Face
        Grounding DINO checkpoint (local directory or hub name) as the start."""
        if name_or_path in PRESETS:
            return cls(preset_config(name_or_path), settings)
        from dinor1 import storage

        if storage.is_uri(name_or_path):  # a model directory in an object store
            name_or_path = str(storage.local_copy(name_or_path))
        path = Path(name_or_path)
        config_file = path / CONFIG_NAME
        if config_file.is_file():
            payload = json.loads(config_file.read_text())
            if payload.get("architecture") == "dinor1":
                model = cls(GroundingDinoConfig.from_dict(payload["grounding_dino"]),
                            DinoR1Settings(**payload["dino_r1"]))
                load_weights(model, path / WEIGHTS_NAME)
                return model
        pretrained = GroundingDinoForObjectDetection.from_pretrained(name_or_path)
        model = cls(pretrained.config, settings)
        model.gdino = pretrained
        model._freeze_unused()
        return model


def save_weights(module: nn.Module, path: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A module's weights as safetensors: tied tensors stored once (their other names in the
    metadata), each copied out of any flat buffer an optimiser (e.g. DeepSpeed) put it in."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in (state_dict if state_dict is not None else module.state_dict()).items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Inverse of :func:`save_weights`; every tensor of the module must be present."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    state.update({name: state[source] for name, source in aliases.items()})
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
