"""SFT and GRQO training steps of the real objective on one device, without Ray or DeepSpeed:
step times, their ratio, images/s and MFU, measured in one run.

The GPU figures the performance issue asks for (-T at 800x1333 in bf16: the GRQO step against
the SFT step, images/s per GPU, MFU >= 0.35) come from here. It imports only torch,
transformers, safetensors, scipy (the Hungarian matching) and dinor1's model and objectives
(no Ray, DeepSpeed, pydantic or MLflow needed); ``bench/gpu_check.sh`` says in one line which
of them a machine lacks::

    PYTHONPATH=. python3 -m dinor1.bench.objective_steps --preset swin-t --height 800 \\
        --width 1333 --batch-size 2 --device cuda --bf16 [--compare compile]

Each step is the training loop's: :class:`~dinor1.objectives.step.TrainingObjective` (prompts
from the batch's boxes, CDN, matching, detection loss; for GRQO also the frozen reference's
forward, the group rewards and the KL term), backward, gradient clipping and AdamW. Batches are
fixed random pixels with random boxes. FLOPs are counted by ``torch.utils.flop_counter`` on one
step of each kind (forward + backward matmuls and convolutions); the matmul peak is measured in
the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch


def synthetic_batch(batch_size: int, height: int, width: int, objects: int, seed: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """A batch in :class:`~dinor1.data.collate.DetectionCollateFn`'s form."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch_size * objects, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(batch_size * objects, 2, generator=g) * 0.2 + 0.05
    batch = {
        "pixel_values": torch.randn(batch_size, 3, height, width, generator=g),
        "pixel_mask": torch.ones(batch_size, height, width, dtype=torch.int64),
        "boxes": torch.cat([centres, sizes], 1),
        "class_labels": torch.randint(0, 6, (batch_size * objects,), generator=g),
        "num_boxes": torch.full((batch_size,), objects, dtype=torch.int64),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _build(preset: str, seed: int, device: torch.device, compile_model: bool):
    from dinor1.model.compile import compile_hot_modules
    from dinor1.model.dino_r1 import DinoR1
    from dinor1.objectives.step import TrainingObjective

    torch.manual_seed(seed)
    model = DinoR1.from_pretrained(preset).train().to(device)
    model.gdino.model.text_backbone.requires_grad_(False)  # as model.freeze_text_encoder
    if compile_model:
        compile_hot_modules(model)
    return model, TrainingObjective(model)


def time_objective_steps(*, preset: str = "tiny-cpu", batch_size: int = 2, height: int = 128,
                         width: int = 128, objects: int = 4, steps: int = 10, warmup: int = 3,
                         seed: int = 0, device: str = "cpu", bf16: bool = False,
                         compile_model: bool = False) -> dict:
    """Median seconds per SFT and per GRQO step, FLOPs of each, peak device memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from dinor1.model.randomness import step_generators
    from dinor1.objectives.reference import ReferenceModel
    from dinor1.objectives.step import ObjectiveSettings

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")  # as the training loop
    dev = torch.device(device)
    model, objective = _build(preset, seed, dev, compile_model)
    reference = ReferenceModel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(batch_size, height, width, objects, seed, dev)
    settings = ObjectiveSettings()
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())

    def step(stage: str, index: int, precision=autocast) -> None:
        generators = step_generators(seed + index, dev)
        with precision:
            loss, _ = objective(batch, stage=stage, settings=settings, generators=generators,
                                reference=reference if stage == "grqo" else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    result: dict = {"preset": preset, "params": sum(p.numel() for p in model.parameters())}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for stage in ("sft", "grqo"):
        for i in range(warmup):  # (a compiled model compiles here)
            step(stage, i)
        # counted in fp32: the count depends on shapes only, and the counter's dispatch mode
        # breaks autocast's casts inside the reference's inference-mode forward
        with FlopCounterMode(display=False) as counter:
            step(stage, warmup, contextlib.nullcontext())
        result[f"{stage}_flops"] = counter.get_total_flops()
        times = []
        for i in range(steps):
            _sync(dev)
            started = time.perf_counter()
            step(stage, warmup + 1 + i)
            _sync(dev)
            times.append(time.perf_counter() - started)
        result[f"{stage}_seconds"] = statistics.median(times)
    if dev.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    result["grqo_over_sft"] = result["grqo_seconds"] / result["sft_seconds"]
    return result


def run(args: argparse.Namespace) -> dict:
    from dinor1.bench.model_step import matmul_peak

    dev = torch.device(args.device)
    shape = dict(preset=args.preset, batch_size=args.batch_size, height=args.height,
                 width=args.width, objects=args.objects, steps=args.steps, warmup=args.warmup,
                 device=args.device, bf16=args.bf16)
    result = time_objective_steps(**shape)
    peak = matmul_peak(dev, torch.bfloat16 if args.bf16 else torch.float32)
    result["matmul_peak_flops"] = peak
    precision = "bf16 autocast" if args.bf16 else "fp32"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"{args.preset}: {result['params'] / 1e6:.1f}M params, batch {args.batch_size} x "
          f"{args.height}x{args.width}, {args.objects} boxes/image, {name}, {precision}")
    for stage in ("sft", "grqo"):
        seconds, flops = result[f"{stage}_seconds"], result[f"{stage}_flops"]
        result[f"{stage}_mfu"] = flops / seconds / peak
        print(f"  {stage.upper():4s} step {seconds * 1000:9.1f} ms  {args.batch_size / seconds:7.1f} "
              f"images/s  {flops / 1e12:7.3f} TFLOP/step  MFU {result[f'{stage}_mfu']:.3f}")
    print(f"  GRQO / SFT step   {result['grqo_over_sft']:.3f}   (target <= 1.25)")
    print(f"  matmul peak       {peak / 1e12:.1f} TFLOP/s ({precision}, measured in this run)")
    print("  MFU target (GPU bf16) >= 0.35")
    if "peak_memory_gb" in result:
        print(f"  peak GPU memory   {result['peak_memory_gb']:.1f} GiB")
    if args.compare == "compile":
        started = time.perf_counter()
        compiled = time_objective_steps(**shape, compile_model=True)
        for stage in ("sft", "grqo"):
            ratio = compiled[f"{stage}_seconds"] / result[f"{stage}_seconds"]
            result[f"{stage}_compile_over_eager"] = ratio
            print(f"  {stage.upper():4s} compiled / eager  {ratio:.3f}  "
                  f"({compiled[f'{stage}_seconds'] * 1000:.1f} ms)")
        print(f"  (compiling + timing took {time.perf_counter() - started:.0f} s)")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compare", choices=["compile"], default=None)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
