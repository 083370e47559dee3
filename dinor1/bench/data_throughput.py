"""Ray Data pipeline throughput vs a single-process loop over the same shards.

Both sides do the same work per sample: read the tar, decode the image with PIL, resize and
build targets (:class:`~dinor1.data.transforms.DecodeSample`), then collate batches
(:class:`~dinor1.data.collate.DetectionCollateFn`). The single-process loop runs in this process
with no Ray; the pipeline runs on a local Ray cluster with ``num_cpus`` CPUs and is consumed
here. Torch runs one thread on both sides (a single core; a Ray Train worker given one CPU gets
one), so the baseline is truly per core. Two batch forms, each measured on both sides:

- ``uint8``: what a GPU worker's pipeline delivers (``data.normalize_on: device``: the pixels
  are normalised on the GPU, so that float work is not the pipeline's);
- ``float``: what a CPU worker's delivers (normalised in the collate).

Printed per form: samples/s of each side (best of ``repeats`` epochs, after one warm-up epoch
for Ray), the pipeline's time to its first batch, and

    ratio per core = (pipeline samples/s / cores) / (single-process samples/s)

where cores = ``min(num_cpus, shards)``, the cores the pipeline could use.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _single_process_epoch(shard_set, cfg, normalize: bool) -> tuple[int, float]:
    from dinor1.data.datasource import iter_shard_rows
    from dinor1.data.pipeline import collate_fn
    from dinor1.data.transforms import DecodeSample

    decode = DecodeSample(max(cfg.train_short_sides), cfg.train_max_size, shard_set.category_ids)
    collate = collate_fn(cfg, train=True, normalize=normalize)
    t0, n, rows = time.perf_counter(), 0, []

    def flush():
        batch = {k: [r[k] for r in rows] for k in rows[0]}
        return len(collate(batch)["image_ids"])

    for path in shard_set.paths:
        with shard_set.filesystem.open_input_stream(path) as f:
            for row in iter_shard_rows(f, path):
                rows.append(decode.decode_row(row))
                if len(rows) == cfg.batch_size:
                    n += flush()
                    rows = []
    if rows:
        n += flush()
    return n, time.perf_counter() - t0


def _ray_epoch(ds, cfg, normalize: bool) -> tuple[int, float, float]:
    """(samples, seconds, seconds to the first batch) of one epoch through the pipeline."""
    from dinor1.data.pipeline import iter_collated_batches

    t0, n, first = time.perf_counter(), 0, None
    for batch in iter_collated_batches(ds, cfg, train=True, device="cpu", normalize=normalize):
        first = time.perf_counter() - t0 if first is None else first
        n += len(batch["image_ids"])
    return n, time.perf_counter() - t0, first or 0.0


def run_data_benchmark(
    *,
    shards: str | None = None,
    num_images: int = 2000,
    image_size: int = 384,
    num_cpus: int | None = None,
    batch_size: int = 16,
    repeats: int = 2,
    work_dir: str | None = None,
) -> dict:
    import numpy as np

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from dinor1.config import DataConfig
    from dinor1.data.pipeline import detection_dataset, open_shard_set

    num_cpus = num_cpus or os.cpu_count() or 1
    if shards is None:
        from data_pipelines.converters import load_coco
        from data_pipelines.shard_writer import write_shards
        from data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco

        work = Path(work_dir or tempfile.mkdtemp(prefix="dinor1-bench-"))
        config = SyntheticConfig(image_size=image_size, num_train=num_images, num_val=1,
                                 num_support=1, image_format="jpg")
        ann = generate_synthetic_coco(work / "coco", config, num_workers=num_cpus)["train"]
        shards = str(work / "shards")
        per_shard = max(1, -(-num_images // (4 * num_cpus)))  # enough files to spread over cores
        write_shards(load_coco(ann, work / "coco" / "images" / "train"), shards,
                     samples_per_shard=per_shard, num_workers=num_cpus, progress=False)
    shard_set = open_shard_set(shards)
    side = min(800, image_size)
    cfg = DataConfig(batch_size=batch_size, train_short_sides=[side], train_max_size=1333,
                     local_shuffle_buffer=0, prefetch_batches=4)

    forms = {"uint8": False, "float": True}  # form -> normalised in the collate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {form: max(n / t for n, t in (_single_process_epoch(shard_set, cfg, norm)
                                               for _ in range(repeats)))
                  for form, norm in forms.items()}
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            ds = detection_dataset(shard_set, cfg, train=True)
            _ray_epoch(ds, cfg, True)  # warm-up: worker start and imports
            pipeline = {form: [_ray_epoch(ds, cfg, norm) for _ in range(repeats)]
                        for form, norm in forms.items()}
        finally:
            ray.shutdown()
    finally:
        torch.set_num_threads(threads)
    cores = min(num_cpus, len(shard_set.paths))
    samples = pipeline["uint8"][0][0]
    result = {"samples": samples, "image_size": image_size, "cores": cores}
    print(f"data throughput ({samples} samples, {image_size}px jpg, {len(shard_set.paths)} "
          f"shards, batch {batch_size}, {cfg.block_megabytes:g} MiB blocks, best of {repeats}; "
          "1 torch thread):")
    for form in forms:
        pipe_sps = max(n / t for n, t, _ in pipeline[form])
        first = statistics.median(f for _, _, f in pipeline[form])
        result[form] = {"single_process_samples_per_s": single[form],
                        "ray_data_samples_per_s": pipe_sps, "first_batch_s": first,
                        "speedup": pipe_sps / single[form],
                        "ratio_per_core": pipe_sps / cores / single[form]}
        r = result[form]
        where = "GPU worker: normalised on the device" if form == "uint8" else \
            "CPU worker: normalised in the collate"
        print(f"  {form} batches ({where}):")
        print(f"    single process (PIL loop)    {single[form]:8.1f} samples/s")
        print(f"    Ray Data pipeline, {num_cpus} CPU    {pipe_sps:8.1f} samples/s "
              f"(first batch after {first:.2f} s)")
        print(f"    speedup                      {r['speedup']:8.2f}x")
        print(f"    ratio per core used ({cores})   {r['ratio_per_core']:8.2f}   (target >= 0.9)")
        assert np.isfinite(r["ratio_per_core"])
    return result
