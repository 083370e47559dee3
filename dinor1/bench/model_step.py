"""Forward+backward time of a DINO-R1 preset with visual prompts (and CDN), per step.

    dinor1 bench model --preset tiny-cpu --batch-size 4 --image-size 128
"""

from __future__ import annotations

import time

import torch


def run_model_benchmark(*, preset: str = "tiny-cpu", batch_size: int = 4, image_size: int = 128,
                        steps: int = 20, warmup: int = 3, objects: int = 4, seed: int = 0) -> dict:
    from dinor1.model.denoising import build_denoising_queries
    from dinor1.model.dino_r1 import DinoR1
    from dinor1.model.prompts import assemble_training_prompts

    torch.manual_seed(seed)
    model = DinoR1.from_pretrained(preset).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    mask = torch.ones(batch_size, image_size, image_size, dtype=torch.long)
    boxes = [torch.rand(objects, 4, generator=g) * 0.4 + 0.3 for _ in range(batch_size)]
    labels = [torch.randint(0, 6, (objects,), generator=g) for _ in range(batch_size)]

    def step():
        features = model.image_features(pixels, mask)
        prompts = assemble_training_prompts(model, features, boxes, labels, generator=g)
        embeddings = prompts.embeddings[None].expand(batch_size, -1, -1)
        targets = [{"labels": t, "boxes": b} for t, b in zip(prompts.target_labels, boxes)]
        dn = build_denoising_queries(targets, embeddings, model.config.num_queries, generator=g)
        out = model(pixels, mask, model.visual_prompts(embeddings), features=features,
                    denoising=dn)
        loss = (out.logits.sigmoid().mean() + out.boxes.mean() + out.dn_logits.sigmoid().mean()
                + out.encoder_logits.sigmoid().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {params / 1e6:.2f}M params, batch {batch_size} x {image_size}px, "
          f"forward+backward+AdamW {per_step * 1000:.0f} ms/step ({batch_size / per_step:.1f} "
          f"images/s), {torch.get_num_threads()} threads")
    return {"preset": preset, "seconds_per_step": per_step, "params": params}
