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

On a machine with few cores that wall-clock ratio mixes the pipeline's cost with Ray's own
processes competing for the same cores, so the same run also counts CPU time (``psutil``, every
process of the Ray node the benchmark started) per sample: the task workers (read + decode), this
process (Ray's batch iterator, the streaming executor, the collate), Ray's daemons and actors;
and the single process's read+decode and collate apart. Their quotient

    read+decode efficiency = single-process read+decode CPU / Ray task workers' CPU (per sample)

is the per-core figure free of core sharing: 1.0 would be Ray's decode stage costing nothing more
per sample than the same code in one process.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def synthetic_jpeg_shards(work: Path, num_images: int, image_size: int, samples_per_shard: int,
                          num_workers: int) -> str:
    """Shards of ``num_images`` synthetic square JPEGs under ``work``; returns the shard folder."""
    from dinor1.data_pipelines.converters import load_coco
    from dinor1.data_pipelines.shard_writer import write_shards
    from dinor1.data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco

    config = SyntheticConfig(image_size=image_size, num_train=num_images, num_val=1,
                             num_support=1, image_format="jpg")
    ann = generate_synthetic_coco(work / "coco", config, num_workers=num_workers)["train"]
    shards = str(work / "shards")
    write_shards(load_coco(ann, work / "coco" / "images" / "train"), shards,
                 samples_per_shard=samples_per_shard, num_workers=num_workers, progress=False)
    return shards


def _single_process_epoch(shard_set, cfg, normalize: bool,
                          cpu: dict | None = None) -> tuple[int, float]:
    """(samples, seconds); adds this thread's CPU seconds spent in read+decode and in the
    collate to ``cpu["read_decode"]`` and ``cpu["collate"]``."""
    from dinor1.data.datasource import iter_shard_rows
    from dinor1.data.pipeline import collate_fn
    from dinor1.data.transforms import DecodeSample

    decode = DecodeSample(max(cfg.train_short_sides), cfg.train_max_size, shard_set.category_ids)
    collate = collate_fn(cfg, train=True, normalize=normalize)
    t0, n, rows = time.perf_counter(), 0, []
    cpu = {} if cpu is None else cpu
    collate_cpu, start_cpu = 0.0, time.thread_time()

    def flush():
        nonlocal collate_cpu
        c0 = time.thread_time()
        batch = {k: [r[k] for r in rows] for k in rows[0]}
        done = len(collate(batch)["image_ids"])
        collate_cpu += time.thread_time() - c0
        return done

    for path in shard_set.paths:
        with shard_set.filesystem.open_input_stream(path) as f:
            for row in iter_shard_rows(f, path):
                rows.append(decode.decode_row(row))
                if len(rows) == cfg.batch_size:
                    n += flush()
                    rows = []
    if rows:
        n += flush()
    seconds = time.perf_counter() - t0
    cpu["collate"] = cpu.get("collate", 0.0) + collate_cpu
    cpu["read_decode"] = cpu.get("read_decode", 0.0) + time.thread_time() - start_cpu - collate_cpu
    return n, seconds


def ray_node_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process and by every process of the
    Ray node this process started, grouped: ``consumer`` (this process), ``task_workers``
    (the raylet's worker processes that are not actors), ``actors`` (Ray Data's stats and
    autoscaling actors, agents) and ``daemons`` (raylet, GCS, dashboard, monitors)."""
    import psutil
    import ray

    def used(proc: psutil.Process) -> float:
        try:
            times = proc.cpu_times()
            return times.user + times.system
        except psutil.Error:  # ended between listing and reading
            return 0.0

    me = psutil.Process()
    totals = {"consumer": used(me), "task_workers": 0.0, "actors": 0.0, "daemons": 0.0}
    node = ray._private.worker._global_node  # the node ray.init started here (private API)
    raylets = []
    for kind, infos in node.all_processes.items():
        for info in infos:
            proc = psutil.Process(info.process.pid)
            totals["daemons"] += used(proc)
            if kind == "raylet":
                raylets.append(proc)
    for raylet in raylets:
        for child in raylet.children(recursive=True):
            try:
                name = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if not name.startswith("ray::"):
                totals["daemons"] += used(child)
            elif any(word in name for word in ("Actor", "Agent", "Coordinator")):
                totals["actors"] += used(child)
            else:  # "ray::IDLE" or the task it runs now (ReadShard, MapBatches(...))
                totals["task_workers"] += used(child)
    return totals


def _ray_epoch(ds, cfg, normalize: bool) -> tuple[int, float, float]:
    """(samples, seconds, seconds to the first batch) of one epoch through the pipeline."""
    from dinor1.data.epochs import EpochBatches
    from dinor1.data.pipeline import iter_collated_batches

    # consumed as the training loop does: collated in a thread of its own, a few batches ahead
    epochs = EpochBatches(lambda e: iter_collated_batches(ds, cfg, train=True, epoch=e,
                                                          device="cpu", normalize=normalize),
                          [0], lookahead=cfg.epoch_lookahead_batches)
    t0, n, first = time.perf_counter(), 0, None
    for batch in epochs.batches(0):
        first = time.perf_counter() - t0 if first is None else first
        n += len(batch["image_ids"])
    epochs.close()
    return n, time.perf_counter() - t0, first or 0.0


_FORMS = {"uint8": False, "float": True}  # batch form -> normalised in the collate


@dataclass(frozen=True)
class DataBenchOptions:
    """What the data benchmarks run on: the shards at ``shards``, or ``num_images`` synthetic
    ``image_size`` JPEGs written under ``work_dir`` (default: a new temporary folder); Ray with
    ``num_cpus`` CPUs (default: this machine's); batches of ``batch_size``; ``repeats``
    measured epochs per side and batch form."""

    shards: str | None = None
    num_images: int = 2000
    image_size: int = 384
    num_cpus: int | None = None
    batch_size: int = 16
    repeats: int = 2
    work_dir: str | None = None

    @property
    def cpus(self) -> int:
        return self.num_cpus or os.cpu_count() or 1

    def shard_set(self):
        """The shard set measured (the synthetic one written first when ``shards`` is None)."""
        from dinor1.data.pipeline import open_shard_set

        shards = self.shards
        if shards is None:  # enough files to spread over the processes
            work = Path(self.work_dir or tempfile.mkdtemp(prefix="dinor1-bench-"))
            per_shard = max(1, -(-self.num_images // (4 * self.cpus)))
            shards = synthetic_jpeg_shards(work, self.num_images, self.image_size, per_shard,
                                           self.cpus)
        return open_shard_set(shards)

    def data_config(self):
        """The training data config at this image size (its other settings as training's
        defaults), without the local shuffle buffer: both sides read the same order."""
        from dinor1.config import DataConfig

        return DataConfig(batch_size=self.batch_size, train_short_sides=[min(800, self.image_size)],
                          train_max_size=1333, local_shuffle_buffer=0)


def run_data_benchmark(options: DataBenchOptions = DataBenchOptions()) -> dict:
    """Measures both sides (module docstring) as ``options`` say; prints the figures and
    returns them."""
    import ray

    num_cpus, repeats = options.cpus, options.repeats
    shard_set, cfg = options.shard_set(), options.data_config()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, single_cpu = _single_process_rates(shard_set, cfg, repeats)
        from dinor1.local_cluster import loopback_only_ray

        loopback_only_ray()  # a Ray of its own (num_cpus), on 127.0.0.1 only
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        try:
            pipeline, ray_cpu = _pipeline_epochs(shard_set, cfg, repeats)
        finally:
            ray.shutdown()
    finally:
        torch.set_num_threads(threads)
    result = _throughput_report(shard_set, cfg, single, pipeline, num_cpus, options.image_size,
                                repeats)
    _cpu_report(result, single_cpu, ray_cpu["uint8"], pipeline["uint8"], repeats)
    return result


def _single_process_rates(shard_set, cfg, repeats: int) -> tuple[dict, dict[str, float]]:
    """({form: best samples/s of ``repeats`` single-process epochs}, CPU seconds of the uint8
    epochs by stage: see `_single_process_epoch`)."""
    single_cpu: dict[str, float] = {}  # of the uint8 epochs
    single = {form: max(n / t for n, t in (
        _single_process_epoch(shard_set, cfg, norm, single_cpu if not norm else None)
        for _ in range(repeats))) for form, norm in _FORMS.items()}
    return single, single_cpu


def _pipeline_epochs(shard_set, cfg, repeats: int) -> tuple[dict, dict]:
    """On the running Ray: one warm-up epoch (worker start and imports), then per form
    ({form: [(samples, seconds, first-batch seconds)] of ``repeats`` epochs}, {form: the Ray
    node's CPU seconds over them by process group: see `ray_node_cpu_seconds`})."""
    import ray

    from dinor1.data.pipeline import detection_dataset

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = detection_dataset(shard_set, cfg, train=True)
    _ray_epoch(ds, cfg, True)  # warm-up: worker start and imports
    pipeline, ray_cpu = {}, {}
    for form, norm in _FORMS.items():
        before = ray_node_cpu_seconds()
        pipeline[form] = [_ray_epoch(ds, cfg, norm) for _ in range(repeats)]
        after = ray_node_cpu_seconds()
        ray_cpu[form] = {k: after[k] - before[k] for k in after}
    return pipeline, ray_cpu


def _throughput_report(shard_set, cfg, single: dict, pipeline: dict, num_cpus: int,
                       image_size: int, repeats: int) -> dict:
    """Prints the samples/s of both sides per form and returns them (the result's start)."""
    import numpy as np

    cores = min(num_cpus, len(shard_set.paths))
    samples = pipeline["uint8"][0][0]
    result = {"samples": samples, "image_size": image_size, "cores": cores}
    print(f"data throughput ({samples} samples, {image_size}px jpg, {len(shard_set.paths)} "
          f"shards, batch {cfg.batch_size}, {cfg.block_megabytes:g} MiB blocks, best of "
          f"{repeats}; 1 torch thread):")
    for form in _FORMS:
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


def _cpu_report(result: dict, single_cpu: dict[str, float], ray_cpu: dict[str, float],
                epochs: list[tuple[int, float, float]], repeats: int) -> None:
    """Adds the CPU milliseconds per sample of the uint8 epochs (``single_cpu``: single process;
    ``ray_cpu`` and ``epochs``: the pipeline's) and the read+decode efficiency to ``result``,
    and prints them."""
    measured = repeats * result["samples"]  # on each side, in the uint8 epochs
    ms = {k: 1000 * v / measured for k, v in single_cpu.items()}
    used = {k: 1000 * v / measured for k, v in ray_cpu.items()}
    wall = sum(t for _, t, _ in epochs)
    result["cpu_ms_per_sample"] = {"single_process": ms, "ray": used}
    result["read_decode_efficiency"] = ms["read_decode"] / used["task_workers"]
    print("  CPU per sample, uint8 batches (ms; psutil, all processes of the Ray node):")
    print(f"    single process               read+decode {ms['read_decode']:.3f}, collate "
          f"{ms['collate']:.3f}")
    print(f"    Ray Data pipeline            task workers (read+decode) {used['task_workers']:.3f}, "
          f"this process (iterator, executor, collate) {used['consumer']:.3f}, Ray daemons "
          f"{used['daemons']:.3f}, actors {used['actors']:.3f}; cores busy "
          f"{sum(ray_cpu.values()) / wall:.2f} of {os.cpu_count()}")
    print(f"    read+decode efficiency       {result['read_decode_efficiency']:8.2f}   (single "
          "process / Ray task workers, CPU per sample)")
