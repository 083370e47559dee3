"""Ray Data pipeline throughput vs a single-process loop over the same shards.

Both sides do the same work per sample: read the tar, decode the image with PIL, resize and
build targets (:class:`~dinor1.data.transforms.DecodeSample`), then collate batches
(:class:`~dinor1.data.collate.DetectionCollateFn`). The single-process loop runs in this process
with no Ray; the pipeline runs on a local Ray cluster with ``num_cpus`` CPUs. Printed:
samples/s of each (best of ``repeats`` epochs, after one warm-up epoch for Ray) and

    ratio per core = (pipeline samples/s / cores) / (single-process samples/s)

where cores = ``min(num_cpus, shards)``, the cores the pipeline could use.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def _single_process_epoch(shard_set, cfg) -> tuple[int, float]:
    from dinor1.data.datasource import iter_shard_rows
    from dinor1.data.pipeline import collate_fn
    from dinor1.data.transforms import DecodeSample

    decode = DecodeSample(max(cfg.train_short_sides), cfg.train_max_size, shard_set.category_ids)
    collate = collate_fn(cfg, train=True)
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


def _ray_epoch(ds, cfg) -> tuple[int, float]:
    from dinor1.data.pipeline import iter_detection_batches

    t0, n = time.perf_counter(), 0
    for batch in iter_detection_batches(ds, cfg, train=True, device="cpu"):
        n += len(batch["image_ids"])
    return n, time.perf_counter() - t0


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

    single = [_single_process_epoch(shard_set, cfg) for _ in range(repeats)]
    single_sps = max(n / t for n, t in single)

    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = detection_dataset(shard_set, cfg, train=True)
        _ray_epoch(ds, cfg)  # warm-up: worker start and imports
        pipeline = [_ray_epoch(ds, cfg) for _ in range(repeats)]
    finally:
        ray.shutdown()
    pipe_sps = max(n / t for n, t in pipeline)
    cores = min(num_cpus, len(shard_set.paths))
    result = {
        "samples": pipeline[0][0],
        "image_size": image_size,
        "cores": cores,
        "single_process_samples_per_s": single_sps,
        "ray_data_samples_per_s": pipe_sps,
        "speedup": pipe_sps / single_sps,
        "ratio_per_core": pipe_sps / cores / single_sps,
    }
    print(f"data throughput ({result['samples']} samples, {image_size}px jpg, "
          f"{len(shard_set.paths)} shards, batch {batch_size}, best of {repeats}):")
    print(f"  single process (PIL loop)  {single_sps:8.1f} samples/s")
    print(f"  Ray Data pipeline, {num_cpus} CPU  {pipe_sps:8.1f} samples/s")
    print(f"  speedup                    {result['speedup']:8.2f}x")
    print(f"  ratio per core used ({cores}) {result['ratio_per_core']:8.2f}   (target >= 0.9)")
    assert np.isfinite(result["ratio_per_core"])
    return result
