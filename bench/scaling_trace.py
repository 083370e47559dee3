"""Model tracing for bench/scaling_arithmetic.py: the models as ``dinor1 train`` builds them,
counted and traced on the ``meta`` device (parameters, saved-for-backward bytes, FLOPs), and
real tiny-cpu steps on this CPU to check the trace against. The script's docstring says what
each number is."""

from __future__ import annotations

import contextlib
import time

import torch

from dinor1.bench.saved_tensors import SavedTensors

IMAGE = (800, 1333)  # the paper's test size and the training maximum (short 800, long <= 1333)
PROMPTS, BOXES = 32, 16  # per batch: categories (visual prompts) and GT boxes per image


def build(preset: str, device: str = "meta"):
    """The model exactly as ``dinor1 train`` builds it for ``model.init=preset``."""
    from dinor1.config import TrainConfig
    from dinor1.train.engine import build_model

    cfg = TrainConfig.model_validate({"model": {"init": preset}})
    with torch.device(device):
        torch.manual_seed(0)
        model = build_model(cfg)
    # level_embed is made with torch.Tensor(...), which ignores the device context
    return model.to(device).train()


# --------------------------------------------------------------------------------- parameters
def no_gradient_prefixes() -> dict[str, int]:
    """Module prefixes (3 levels) of trainable parameters that get NO gradient in a real
    tiny-cpu SFT step with visual prompts (measured here on CPU)."""
    from dinor1.objectives.step import training_losses

    model = build("tiny-cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    batch = synthetic_batch(2, 128, 128, 4, g)
    loss, _ = training_losses(model, batch, stage="sft", generators=g)
    loss.backward()
    found: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            key = ".".join(name.split(".")[:3])
            found[key] = found.get(key, 0) + p.numel()
    return found


def count_parameters(model, no_grad_prefixes) -> dict[str, int]:
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    unused = sum(p.numel() for n, p in params
                 if p.requires_grad and n.startswith(tuple(no_grad_prefixes)))
    text = sum(p.numel() for n, p in params if n.startswith("gdino.model.text_backbone."))
    backbone = sum(p.numel() for n, p in params if n.startswith("gdino.model.backbone."))
    vpe = sum(p.numel() for n, p in params if n.startswith("prompt_encoder."))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"total": total, "trainable": trainable, "no_grad": unused, "with_grad":
            trainable - unused, "text_encoder": text, "backbone": backbone, "vpe": vpe,
            "buffer_bytes": buffers,
            # ZeRO-3 never partitions tensors below stage3_param_persistence_threshold (1e5)
            "zero3_persistent": sum(p.numel() for _, p in params if p.numel() < 100_000)}


# ------------------------------------------------------------------------------ meta tracing
@contextlib.contextmanager
def meta_friendly():
    """Let the model's forward run on meta tensors: transformers' shape assertion and one
    data-dependent ``if not isfinite(x).all()`` (a clamp that never fires) read values."""
    import transformers.models.grounding_dino.modeling_grounding_dino as gd

    check, as_bool = gd.torch_compilable_check, torch.Tensor.__bool__

    def meta_bool(self):
        return True if self.device.type == "meta" else as_bool(self)

    gd.torch_compilable_check = lambda *a, **k: None
    torch.Tensor.__bool__ = meta_bool
    try:
        yield
    finally:
        gd.torch_compilable_check, torch.Tensor.__bool__ = check, as_bool


def synthetic_batch(batch: int, height: int, width: int, boxes: int, g: torch.Generator):
    """A collated batch as DetectionCollateFn makes it (random pixels and boxes)."""
    return {"pixel_values": torch.randn(batch, 3, height, width, generator=g),
            "pixel_mask": torch.ones(batch, height, width, dtype=torch.long),
            "boxes": torch.rand(batch * boxes, 4, generator=g) * 0.3 + 0.3,
            "class_labels": torch.arange(batch * boxes) % 6,
            "num_boxes": torch.tensor([boxes] * batch),
            "image_ids": torch.arange(batch), "num_skipped": torch.tensor(0)}


def policy_forward(model, batch, height, width, device, dtype, prompts=PROMPTS, boxes=BOXES,
                   marks=None, saved=None):
    """The training forward of ``objectives.step.training_losses`` up to the model outputs
    (features, every GT box through the VPE, one prompt per category, CDN queries, decoder)."""
    from dinor1.model.denoising import build_denoising_queries
    from dinor1.model.prompts import prompts_from_exemplars

    def mark(name):
        if marks is not None:
            marks.append((name, saved.total))

    pix = torch.zeros(batch, 3, height, width, device=device, dtype=dtype)
    mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
    gt = torch.full((batch, boxes, 4), 0.3, device=device, dtype=dtype)
    gt_mask = torch.ones(batch, boxes, dtype=torch.bool, device=device)
    features = model.image_features(pix, mask)
    mark("backbone + input projections")
    instances = model.encode_boxes(features, gt, gt_mask)
    mark("visual prompt encoder (all GT boxes)")
    chosen = torch.stack([torch.arange(prompts) % batch, torch.arange(prompts) % boxes], -1)
    embeddings = prompts_from_exemplars(instances, chosen[:, None])[None].expand(batch, -1, -1)
    targets = [{"labels": torch.arange(boxes) % prompts, "boxes": torch.full((boxes, 4), 0.3)}
               for _ in range(batch)]
    dn = build_denoising_queries(targets, embeddings, model.config.num_queries,
                                 num_dn_queries=model.settings.num_dn_queries)
    dn.reference_logits = dn.reference_logits.to(dtype)  # see the bf16 note printed below
    handle = model.core.encoder.register_forward_hook(
        lambda *_: mark("feature enhancer (image x prompts)"))
    try:
        out = model(pix, mask, model.visual_prompts(embeddings), features=features, denoising=dn)
    finally:
        handle.remove()
    mark("proposals + decoder (900 + CDN queries) + heads")
    return out


def trace(preset: str, dtype: torch.dtype, batch: int = 1, flops: bool = True,
          image: tuple[int, int] = IMAGE) -> dict:
    """Saved-for-backward bytes per image by phase, and (``flops``) FLOPs per image and what
    GRQO's reference forward costs and touches, at ``image`` size."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(preset).to(dtype)
    height, width = image
    saved, marks = SavedTensors(model), []
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with meta_friendly():
        with fwd, saved.hooks():
            out = policy_forward(model, batch, height, width, "meta", dtype, marks=marks,
                                 saved=saved)
        phases, last = [], 0
        for name, total in marks:
            phases.append((name, (total - last) / batch))
            last = total
        result = {"saved_per_image": saved.total / batch, "phases": phases}
        if not flops:
            return result
        loss = sum(t.float().sum() for t in (out.logits, out.boxes, out.encoder_logits,
                                               out.encoder_boxes, out.dn_logits, out.dn_boxes))
        with bwd:
            loss.backward()
        # GRQO's reference: forward to query selection only, without a graph
        ref_flops = FlopCounterMode(display=False)
        pix = torch.zeros(batch, 3, height, width, device="meta", dtype=dtype)
        mask = torch.ones(batch, height, width, dtype=torch.long, device="meta")
        gt = torch.full((batch, BOXES, 4), 0.3, device="meta", dtype=dtype)
        gt_mask = torch.ones(batch, BOXES, dtype=torch.bool, device="meta")
        with ref_flops, torch.inference_mode():
            model.reference_forward(pix, mask, prompt_boxes=gt, prompt_box_mask=gt_mask)
        # which parameters the reference forward touches (run once with a graph)
        model.zero_grad(set_to_none=True)
        model.reference_forward(pix, mask, prompt_boxes=gt, prompt_box_mask=gt_mask
                                ).token_objectness.float().sum().backward()
        ref_used = sum(p.numel() for p in model.parameters() if p.grad is not None)
    return {**result, "fwd_flops": fwd.get_total_flops() / batch,
            "bwd_flops": bwd.get_total_flops() / batch,
            "ref_fwd_flops": ref_flops.get_total_flops() / batch, "ref_params_used": ref_used}


# ---------------------------------------------------------------------------- real CPU check
def peak_allocated(fn) -> int:
    """Peak growth of live PyTorch CPU allocations while ``fn`` runs (allocator events from
    torch.profiler with profile_memory, summed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure_cpu(height: int, width: int) -> dict:
    """Real tiny-cpu SFT and GRQO steps (prompts, CDN, forward, matcher, losses, reference,
    backward) on this CPU: their saved-for-backward bytes and peak live allocations, and the
    meta-device trace of the same forward against the same forward on real tensors."""
    from dinor1.objectives.reference import ReferenceModel
    from dinor1.objectives.step import training_losses

    torch.manual_seed(0)
    model = build("tiny-cpu", "cpu")
    reference = ReferenceModel(model, "epoch")
    g = torch.Generator().manual_seed(0)
    batch = synthetic_batch(1, height, width, BOXES, g)
    out = {}
    for stage in ("timed", "sft", "grqo"):  # "timed": an SFT step without the profiler
        model.zero_grad(set_to_none=True)
        saved = SavedTensors(model)

        def step(stage=stage, saved=saved):
            with saved.hooks():
                loss, _ = training_losses(model, batch, stage=stage.replace("timed", "sft"),
                                          generators=g, reference=reference)
            loss.backward()

        if stage == "timed":
            start = time.perf_counter()
            step()
            out["sft_seconds"] = time.perf_counter() - start
        else:
            out[stage] = {"peak": peak_allocated(step), "saved_bytes": saved.total}
    with meta_friendly():
        meta_model = build("tiny-cpu")
        meta_saved = SavedTensors(meta_model)
        with meta_saved.hooks():
            policy_forward(meta_model, 1, height, width, "meta", torch.float32)
        cpu_saved = SavedTensors(model)
        with cpu_saved.hooks():
            policy_forward(model, 1, height, width, "cpu", torch.float32)
    out["forward_trace_meta"], out["forward_trace_cpu"] = meta_saved.total, cpu_saved.total
    counted = trace("tiny-cpu", torch.float32, image=(height, width))
    out["step_flops"] = counted["fwd_flops"] + counted["bwd_flops"]
    return out
