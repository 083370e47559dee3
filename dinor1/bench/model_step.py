"""Forward+backward time of a DINO-R1 preset with visual prompts (and CDN), per step, and the
model FLOP utilisation: the step's FLOPs (counted by ``torch.utils.flop_counter`` on one real
step) / its time, over the machine's matmul peak measured in the same run.

    dinor1 bench model --preset tiny-cpu --batch-size 4 --image-size 128
    dinor1 bench model --preset swin-t --image-size 800 --device cuda --bf16   # on a GPU
    dinor1 bench model --compare compile        # the same steps with torch.compile: the ratio
"""

from __future__ import annotations

import contextlib
import time

import torch


def matmul_peak(device: torch.device, dtype: torch.dtype, *, size: int = 2048,
                seconds: float = 2.0) -> float:
    """Measured FLOP/s of square matmuls (the best of a few timed batches)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - t0))
    return best


VARIANTS = ("compile", "channels_last")


def _build(preset: str, seed: int, dev: torch.device, variant: str | None,
           compile_backend: str):
    from dinor1.model.compile import compile_hot_modules, use_channels_last
    from dinor1.model.dino_r1 import DinoR1

    torch.manual_seed(seed)
    model = DinoR1.from_pretrained(preset).train().to(dev)
    if variant == "channels_last":
        use_channels_last(model)
    elif variant == "compile":
        compile_hot_modules(model, backend=compile_backend)
    return model


def _time_steps(model, *, batch_size: int, image_size: int, objects: int, seed: int,
                dev: torch.device, bf16: bool, steps: int, warmup: int,
                count_flops: bool = True) -> tuple[float, int]:
    """(seconds per forward+backward+AdamW step, FLOPs of one step) on fixed random inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    from dinor1.model.denoising import build_denoising_queries
    from dinor1.model.prompts import assemble_training_prompts
    from dinor1.model.randomness import step_generators

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(dev)
    mask = torch.ones(batch_size, image_size, image_size, dtype=torch.long, device=dev)
    boxes = [(torch.rand(objects, 4, generator=g) * 0.4 + 0.3).to(dev) for _ in range(batch_size)]
    labels = [torch.randint(0, 6, (objects,), generator=g).to(dev) for _ in range(batch_size)]
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    generators = step_generators(seed, dev)  # host: exemplar choice; device: CDN noise

    def step():
        with autocast:
            features = model.image_features(pixels, mask)
            prompts = assemble_training_prompts(model, features, boxes, labels,
                                                generator=generators.host)
            embeddings = prompts.embeddings[None].expand(batch_size, -1, -1)
            targets = [{"labels": t, "boxes": b} for t, b in zip(prompts.target_labels, boxes)]
            dn = build_denoising_queries(targets, embeddings, model.config.num_queries,
                                         generator=generators.device)
            out = model(pixels, mask, model.visual_prompts(embeddings), features=features,
                        denoising=dn)
            loss = (out.logits.sigmoid().mean() + out.boxes.mean()
                    + out.dn_logits.sigmoid().mean() + out.encoder_logits.sigmoid().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):  # (a compiled model compiles here)
        step()
    flops = 0
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()  # forward + backward matmuls/convs (not AdamW)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps, flops


def run_model_benchmark(*, preset: str = "tiny-cpu", batch_size: int = 4, image_size: int = 128,
                        steps: int = 20, warmup: int = 3, objects: int = 4, seed: int = 0,
                        device: str = "cpu", bf16: bool = False, compare: str | None = None,
                        compile_backend: str = "inductor") -> dict:
    """Step time, FLOPs and MFU of ``preset``; with ``compare`` (one of :data:`VARIANTS`) also
    the same steps with that speed option on, and the ratio of the two step times."""
    if compare is not None and compare not in VARIANTS:
        raise ValueError(f"compare must be one of {VARIANTS}, got {compare!r}")
    dev = torch.device(device)
    shape = dict(batch_size=batch_size, image_size=image_size, objects=objects, seed=seed,
                 dev=dev, bf16=bf16, steps=steps, warmup=warmup)
    model = _build(preset, seed, dev, None, compile_backend)
    per_step, flops = _time_steps(model, **shape)
    peak = matmul_peak(dev, torch.bfloat16 if bf16 else torch.float32)
    params = sum(p.numel() for p in model.parameters())
    achieved = flops / per_step
    result = {"preset": preset, "seconds_per_step": per_step, "params": params,
              "flops_per_step": flops, "achieved_flops": achieved, "matmul_peak_flops": peak,
              "mfu": achieved / peak}
    precision = "bf16 autocast" if bf16 else "fp32"
    print(f"{preset}: {params / 1e6:.2f}M params, batch {batch_size} x {image_size}px, {device}, "
          f"{precision}, {torch.get_num_threads()} threads")
    print(f"  forward+backward+AdamW  {per_step * 1000:10.1f} ms/step "
          f"({batch_size / per_step:.1f} images/s)")
    print(f"  FLOPs per step          {flops / 1e9:10.2f} GFLOP (counted, forward+backward)")
    print(f"  achieved                {achieved / 1e9:10.2f} GFLOP/s")
    print(f"  matmul peak (measured)  {peak / 1e9:10.2f} GFLOP/s ({precision} {2048}^2)")
    print(f"  MFU = achieved / peak   {result['mfu']:10.3f}   (GPU bf16 target >= 0.35)")
    if compare is not None:
        del model
        variant = _build(preset, seed, dev, compare, compile_backend)
        started = time.perf_counter()
        variant_step, _ = _time_steps(variant, **shape, count_flops=False)
        result[f"{compare}_seconds_per_step"] = variant_step
        result[f"{compare}_over_eager"] = variant_step / per_step
        label = f"compile ({compile_backend})" if compare == "compile" else compare
        print(f"  with {label:18s} {variant_step * 1000:10.1f} ms/step "
              f"(warm-up + timing {time.perf_counter() - started:.0f} s)")
        print(f"  {compare} / plain step   {result[f'{compare}_over_eager']:10.3f}   "
              "(< 1 is faster)")
    return result
