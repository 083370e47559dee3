"""The Ray Data pipeline against the loader users would otherwise write: a torch ``DataLoader``.

``dinor1 bench data --peer`` measures both on the same shards, in one run, with the same number
of processes doing the work:

- the Ray Data pipeline (:func:`~dinor1.data.pipeline.detection_dataset`) on a Ray with
  ``num_cpus`` CPUs: read + decode tasks on those CPUs, the collate in this process (a training
  worker's place), as ``dinor1 bench data`` runs it;
- the webdataset-style peer: a ``DataLoader`` with ``num_workers = num_cpus`` persistent worker
  processes over :class:`ShardBatches`, an ``IterableDataset`` that gives each worker whole
  shards, reads them with the same tar reader (:func:`~dinor1.data.datasource.iter_shard_rows`),
  decodes with the same :class:`~dinor1.data.transforms.DecodeSample` at the same training size
  and collates with the same :class:`~dinor1.data.collate.DetectionCollateFn` in the worker
  (webdataset's ``.batched(n, collation_fn)`` with ``DataLoader(batch_size=None)``); this
  process only receives the batches.

Torch runs one thread in every process of both sides. Each side has a warm-up epoch (worker start
and imports; its first batch is printed as the "warm-up" one), then the two sides' epochs alternate,
``repeats`` of each per batch form, and the best is kept: the machine's background load falls on
both alike. Printed per form (``uint8``: a GPU worker's batches, ``data.normalize_on: device``;
``float``: a CPU worker's, normalised in the collate): samples/s of each side and after an
epoch's first batch (its start-up left out), their quotients ``ray / dataloader``, the time to
an epoch's first batch, and the CPU time per sample of all the processes of each side (psutil:
the Ray node's processes and this one; the DataLoader's workers and this one), also by process.

At ``num_cpus`` 1 the two are not quite the same shape: the pipeline decodes on its one CPU and
collates in this process, beside it; the DataLoader's one worker decodes and collates in turn.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinor1.bench.data_throughput import (
    _FORMS,
    DataBenchOptions,
    _ray_epoch,
    ray_node_cpu_seconds,
)


class ShardBatches(IterableDataset):
    """Collated batches from whole shards, the shard list split across DataLoader workers.

    Each worker takes every ``num_workers``-th shard of the (per epoch shuffled, with
    ``shuffle_files``) shard list, reads it with ``iter_shard_rows``, skips rows that cannot be
    used (the reader's error rows, and those ``decode`` marks), optionally shuffles the decoded
    samples in a buffer of ``shuffle_buffer`` (as the pipeline's local shuffle buffer), and
    yields batches of ``batch_size`` collated by ``collate`` (the last one of each worker may be
    smaller). Use with ``DataLoader(batch_size=None)``.

    The epoch (file order, shuffle buffer, the collate's augmentation seed) counts the passes
    each process has started, from ``first_epoch``: with persistent workers every worker starts
    one pass per epoch, so they stay in step.
    """

    def __init__(self, paths: list[str], filesystem, decode, collate, batch_size: int, *,
                 shuffle_files: bool = False, shuffle_buffer: int = 0, seed: int = 0,
                 first_epoch: int = 0):
        super().__init__()
        self.paths, self.filesystem = list(paths), filesystem
        self.decode, self.collate, self.batch_size = decode, collate, batch_size
        self.shuffle_files, self.shuffle_buffer, self.seed = shuffle_files, shuffle_buffer, seed
        self.epoch = first_epoch

    def _samples(self, paths: list[str]):
        from dinor1.data.datasource import iter_shard_rows

        for path in paths:
            with self.filesystem.open_input_stream(path) as f:
                for row in iter_shard_rows(f, path):
                    if row["error"]:
                        continue
                    sample = self.decode.decode_row(row)
                    if not sample["error"]:
                        yield sample

    def _shuffled(self, samples, rng: np.random.Generator):
        """A random sample of at least ``shuffle_buffer`` held ones each time one comes in."""
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        paths = list(self.paths)
        if self.shuffle_files:  # the same order in every worker: each takes its own part
            np.random.default_rng([self.seed, epoch]).shuffle(paths)
        samples = self._samples(paths[worker::workers])
        if self.shuffle_buffer > 0:
            samples = self._shuffled(samples, np.random.default_rng([self.seed, epoch, worker]))
        self.collate.epoch = epoch
        rows = []
        for sample in samples:
            rows.append(sample)
            if len(rows) == self.batch_size:
                yield self._collated(rows)
                rows = []
        if rows:
            yield self._collated(rows)

    def _collated(self, rows: list[dict]) -> dict:
        return self.collate({k: [r[k] for r in rows] for k in rows[0]})


def one_torch_thread(worker_id: int) -> None:
    """``worker_init_fn``: torch on one thread in each DataLoader worker."""
    torch.set_num_threads(1)


def peer_loader(shard_set, cfg, *, normalize: bool, num_workers: int,
                first_epoch: int = 0) -> DataLoader:
    """The DataLoader peer of the training pipeline for ``cfg`` (a ``DataConfig``): same
    decode (training size), same collate (``normalize=False``: uint8 batches for normalising on
    the device), same batch size, file shuffle and local shuffle buffer."""
    from dinor1.data.pipeline import collate_fn
    from dinor1.data.transforms import DecodeSample

    decode = DecodeSample(max(cfg.train_short_sides), cfg.train_max_size,
                          shard_set.category_ids, keep_crowd=cfg.keep_crowd)
    dataset = ShardBatches(shard_set.paths, shard_set.filesystem, decode,
                           collate_fn(cfg, train=True, epoch=first_epoch, normalize=normalize),
                           cfg.batch_size, shuffle_files=cfg.shuffle_files,
                           shuffle_buffer=cfg.local_shuffle_buffer, seed=cfg.seed,
                           first_epoch=first_epoch)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=False,
                      worker_init_fn=one_torch_thread)


def _loader_epoch(loader: DataLoader) -> tuple[int, float, float]:
    """(samples, seconds, seconds to the first batch) of one pass over ``loader``."""
    t0, n, first = time.perf_counter(), 0, None
    for batch in loader:
        first = time.perf_counter() - t0 if first is None else first
        n += len(batch["image_ids"])
    return n, time.perf_counter() - t0, first or 0.0


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of the processes ``pids``."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:  # ended
            continue
        total += times.user + times.system
    return total


def _ray_cpu_seconds() -> dict[str, float] | None:
    """CPU seconds so far of the Ray node this process started and of this process, by group
    (``ray_node_cpu_seconds``); None when Ray runs elsewhere (a cluster this process only
    connected to)."""
    try:
        return ray_node_cpu_seconds()
    except Exception:  # no node started here: the accounting does not apply
        return None


def _shutdown(loader: DataLoader) -> None:
    """Ends a persistent-worker loader's processes now rather than at garbage collection."""
    iterator = getattr(loader, "_iterator", None)  # torch keeps it for persistent workers
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class _Loaders:
    """One DataLoader per batch form, their workers started (a warm-up epoch each)."""

    def __init__(self, shard_set, cfg, forms: tuple[str, ...], num_workers: int):
        import psutil

        self.loaders, self.workers, self.warmup = {}, {}, {}
        me = psutil.Process()
        for form in forms:
            before = {p.pid for p in me.children()}
            self.loaders[form] = peer_loader(shard_set, cfg, normalize=_FORMS[form],
                                             num_workers=num_workers)
            self.warmup[form] = _loader_epoch(self.loaders[form])
            self.workers[form] = [p.pid for p in me.children() if p.pid not in before]

    def epoch(self, form: str) -> tuple[tuple[int, float, float], dict[str, float]]:
        """One pass of ``form``'s loader and the CPU seconds of its workers and this process."""
        groups = {"workers": self.workers[form], "consumer": [os.getpid()]}
        before = {k: _cpu_seconds(pids) for k, pids in groups.items()}
        result = _loader_epoch(self.loaders[form])
        return result, {k: _cpu_seconds(pids) - before[k] for k, pids in groups.items()}

    def close(self) -> None:
        for loader in self.loaders.values():
            _shutdown(loader)


def _ray_side_epoch(ds, cfg, form: str) -> tuple[tuple[int, float, float],
                                                  dict[str, float] | None]:
    """One epoch of the pipeline and the CPU seconds of the Ray node's process groups."""
    before = _ray_cpu_seconds()
    result = _ray_epoch(ds, cfg, _FORMS[form])
    after = _ray_cpu_seconds()
    if before is None or after is None:
        return result, None
    return result, {k: after[k] - before[k] for k in after}


def _add_cpu(total: dict[str, float] | None, cpu: dict[str, float] | None):
    if total is None or cpu is None:
        return None
    return {k: total.get(k, 0.0) + v for k, v in cpu.items()}


def run_peer_benchmark(options: DataBenchOptions = DataBenchOptions(), *,
                       forms: tuple[str, ...] = ("uint8", "float")) -> dict:
    """Measures both sides (module docstring) as ``options`` say, for the batch ``forms``, and
    prints the table. Uses the Ray this process already runs, if any (its datasets then limited
    to ``num_cpus`` CPUs), else starts one with ``num_cpus`` CPUs and stops it at the end."""
    import ray

    num_cpus = options.cpus
    unknown = [f for f in forms if f not in _FORMS]
    if unknown or not forms:
        raise ValueError(f"forms must be among {sorted(_FORMS)}, got {forms}")
    shard_set, cfg = options.shard_set(), options.data_config()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    own_ray = not ray.is_initialized()
    loaders = None
    try:
        # the DataLoader's workers fork before this process starts Ray's threads
        loaders = _Loaders(shard_set, cfg, forms, num_cpus)
        if own_ray:
            from dinor1.local_cluster import loopback_only_ray

            loopback_only_ray()  # a Ray of its own (num_cpus), on 127.0.0.1 only
            ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
        try:
            runs = _measure(shard_set, cfg, loaders, forms, num_cpus, options.repeats)
        finally:
            if own_ray:
                ray.shutdown()
    finally:
        if loaders is not None:
            loaders.close()
        torch.set_num_threads(threads)
    return _report(shard_set, cfg, runs, num_cpus, options.image_size, options.repeats)


def _measure(shard_set, cfg, loaders: _Loaders, forms, num_cpus: int, repeats: int) -> dict:
    """{form: {"ray"|"dataloader": {"epochs": [(samples, s, first s)], "warmup": (...),
    "cpu": {process group: CPU seconds over the epochs} or None}}}: a warm-up epoch of the
    pipeline per form, then ``repeats`` epochs of each side per form, alternating which side
    goes first."""
    import ray
    from ray.data._internal.execution.interfaces import ExecutionResources

    from dinor1.data.pipeline import detection_dataset

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = detection_dataset(shard_set, cfg, train=True)
    if ray.cluster_resources().get("CPU", 0) > num_cpus:  # a bigger Ray: this dataset's share
        ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
            cpu=num_cpus)
    runs = {form: {"ray": {"epochs": [], "cpu": {}, "warmup": _ray_epoch(ds, cfg, _FORMS[form])},
                   "dataloader": {"epochs": [], "cpu": {}, "warmup": loaders.warmup[form]}}
            for form in forms}
    sides = {"ray": lambda form: _ray_side_epoch(ds, cfg, form), "dataloader": loaders.epoch}
    for r in range(repeats):
        for form in forms:
            for side in ("dataloader", "ray") if r % 2 == 0 else ("ray", "dataloader"):
                epoch, cpu = sides[side](form)
                run = runs[form][side]
                run["epochs"].append(epoch)
                run["cpu"] = _add_cpu(run["cpu"], cpu)
    return runs


def _side_figures(run: dict, count: int, batch_size: int) -> dict:
    epochs, cpu = run["epochs"], run["cpu"]
    measured = count * len(epochs)
    return {
        "samples_per_s": max(n / t for n, t, _ in epochs),
        # the rate once an epoch's first batch is out (its start-up left out; the first batch
        # taken as full)
        "after_first_batch_samples_per_s": max((n - batch_size) / (t - f) for n, t, f in epochs),
        "first_batch_s": statistics.median(f for _, _, f in epochs),
        "warmup_first_batch_s": run["warmup"][2],
        "cpu_ms_per_sample": None if cpu is None else 1000 * sum(cpu.values()) / measured,
        "cpu_ms_per_sample_by_group": None if cpu is None else
        {k: 1000 * v / measured for k, v in cpu.items()},
    }


def _cpu_line(figures: dict) -> str:
    ray, loader = (figures[s]["cpu_ms_per_sample_by_group"] for s in ("ray", "dataloader"))
    text = "n/a"
    if ray is not None:
        text = (f"task workers {ray['task_workers']:.2f}, this process "
                f"{ray['consumer']:.2f}, daemons + actors {ray['daemons'] + ray['actors']:.2f}")
    return (f"    CPU ms/sample by process: Ray {text}; DataLoader workers "
            f"{loader['workers']:.2f}, this process {loader['consumer']:.2f}")


def _report(shard_set, cfg, runs: dict, num_cpus: int, image_size: int, repeats: int) -> dict:
    """Prints the table (module docstring) and returns its figures."""
    samples = {side: {n for form in runs for n, _, _ in runs[form][side]["epochs"]}
               for side in ("ray", "dataloader")}
    if len(samples["ray"] | samples["dataloader"]) != 1:
        raise RuntimeError(f"the two sides read different sample counts: {samples}")
    count = samples["ray"].pop()
    result = {"samples": count, "image_size": image_size, "num_cpus": num_cpus,
              "shards": len(shard_set.paths)}
    print(f"data path vs its DataLoader peer ({count} samples, {image_size}px jpg, "
          f"{len(shard_set.paths)} shards, batch {cfg.batch_size}, best of {repeats}, "
          f"epochs alternating; 1 torch thread per process):")
    names = {"ray": f"Ray Data pipeline, {num_cpus} CPU", "dataloader":
             f"DataLoader, {num_cpus} worker{'s' if num_cpus > 1 else ''}"}
    for form, sides in runs.items():
        figures = {side: _side_figures(run, count, cfg.batch_size) for side, run in sides.items()}
        ray, loader = figures["ray"], figures["dataloader"]
        ratio = ray["samples_per_s"] / loader["samples_per_s"]
        after_first = (ray["after_first_batch_samples_per_s"]
                       / loader["after_first_batch_samples_per_s"])
        result[form] = {**figures, "ratio": ratio, "ratio_after_first_batch": after_first}
        where = "GPU worker: normalised on the device" if form == "uint8" else \
            "CPU worker: normalised in the collate"
        print(f"  {form} batches ({where}):")
        print(f"    {'':<28} samples/s  after 1st batch  1st batch s  (warm-up)  CPU ms/sample")
        for side, f in figures.items():
            cpu = f["cpu_ms_per_sample"]
            cpu_text = "n/a" if cpu is None else f"{cpu:.2f}"
            print(f"    {names[side]:<28} {f['samples_per_s']:9.1f}  "
                  f"{f['after_first_batch_samples_per_s']:15.1f}  {f['first_batch_s']:11.2f}  "
                  f"{'(' + format(f['warmup_first_batch_s'], '.2f') + ')':>9}  {cpu_text:>13}")
        target = "   (target >= 1.0)" if form == "uint8" else ""
        print(f"    {'ray / dataloader':<28} {ratio:8.2f}x  {after_first:14.2f}x{target}")
        print(_cpu_line(figures))
    return result
