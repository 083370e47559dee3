"""The consumer's block -> batch path: Ray's numpy conversion of a whole block against
``dinor1.data.batching.numpy_blocks`` (one chunk at a time), each followed by the same
``iter_row_batches`` + collate, on the same blocks fetched once from a local Ray (so only the
conversion differs). Prints CPU ms per sample of each (best of ``--repeats``, alternating) and
new / old.

    python bench/block_conversion.py                        # synthetic 1024 x 384 px JPEGs
    python bench/block_conversion.py --image-size 640 --num-images 768
    python bench/block_conversion.py --shards path/to/shards --image-size 640
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard folder (default: a synthetic set made here)")
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch
    from ray.data.block import BlockAccessor

    from dinor1.bench.data_throughput import synthetic_jpeg_shards
    from dinor1.config import DataConfig
    from dinor1.data.batching import iter_row_batches, numpy_blocks
    from dinor1.data.pipeline import collate_fn, detection_dataset, open_shard_set

    shards = args.shards or synthetic_jpeg_shards(
        Path(tempfile.mkdtemp(prefix="dinor1-blocks-")), args.num_images, args.image_size,
        samples_per_shard=max(1, args.num_images // 8), num_workers=2)
    torch.set_num_threads(1)
    side = min(800, args.image_size)
    cfg = DataConfig(batch_size=args.batch_size, train_short_sides=[side],
                     local_shuffle_buffer=0)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = detection_dataset(open_shard_set(shards), cfg, train=True)
        tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        samples = sum(t.num_rows for t in tables)
        chunks = sum(t["image"].num_chunks for t in tables)
        collate = collate_fn(cfg, train=True, normalize=False)
        ways = {
            "Ray's block conversion (whole block)":
                lambda: (BlockAccessor.for_block(t).to_batch_format("numpy") for t in tables),
            "numpy_blocks (a chunk at a time)": lambda: numpy_blocks(tables),
        }
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(args.repeats):
            for name, blocks in ways.items():
                start = time.thread_time()
                for rows in iter_row_batches(blocks(), args.batch_size):
                    collate(rows)
                best[name] = min(best[name], 1000 * (time.thread_time() - start) / samples)
    finally:
        ray.shutdown()
    print(f"block -> batch CPU per sample ({samples} samples, {args.image_size} px, "
          f"{len(tables)} blocks of {chunks} chunks, batch {args.batch_size}, uint8 collate, "
          f"best of {args.repeats}):")
    for name, ms in best.items():
        print(f"  {name:38s} {ms:.3f} ms")
    old, new = best.values()
    print(f"  numpy_blocks / Ray's conversion        {new / old:.2f}")


if __name__ == "__main__":
    main()
