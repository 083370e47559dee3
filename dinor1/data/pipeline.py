"""Shard locations -> a Ray Dataset of decoded samples -> detection batches.

::

    ds = detection_dataset("shards/train", cfg, train=True)     # driver side
    trainer = TorchTrainer(..., datasets={"train": ds})
    # in each worker:
    shard = ray.train.get_dataset_shard("train")
    for batch in iter_detection_batches(shard, cfg, train=True, epoch=epoch): ...

Shuffling is seeded: the file order by ``FileShuffleConfig(seed)`` (a new order each epoch, the
same sequence of orders for the same seed) and the local buffer by (``seed``, ``epoch``). Which worker
receives which block is decided at run time by Ray's streaming split, so the per-worker order is
reproducible only with ``DataContext.execution_options.preserve_order``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray.data import FileShuffleConfig

from dinor1.config import DataConfig
from dinor1.data.batching import iter_row_batches, numpy_blocks
from dinor1.data.collate import HOST_KEYS, DetectionCollateFn, normalize_pixels
from dinor1.data.datasource import ShardDatasource
from dinor1.data.transforms import DecodeSample
from dinor1.data_pipelines.shard_format import MANIFEST_NAME, SHARD_RE
from dinor1.errors import UserError


@dataclass
class ShardSet:
    """Resolved shard files of one or more locations, with the (first) manifest found."""

    paths: list[str]
    filesystem: pafs.FileSystem
    manifest: dict[str, Any] | None

    @property
    def category_ids(self) -> list[int] | None:
        if not self.manifest:
            return None
        return sorted(int(k) for k in self.manifest["categories"])


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for bad URIs/credentials
            raise UserError(f"cannot open shard location {location}: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def open_shard_set(locations: str | list[str]) -> ShardSet:
    """Resolve shard folders, single ``.tar`` files or URIs (``s3://``, ``gs://``, ``file://``).

    A folder contributes its ``shard-*.tar`` files in name order; a manifest beside them, if any,
    supplies the categories.
    """
    if isinstance(locations, (str, Path)):
        locations = [locations]
    locations = [str(loc) for loc in locations]
    if not locations:
        raise UserError("no shard location given")
    paths: list[str] = []
    manifest = None
    fs = None
    for location in locations:
        fs_i, path = _filesystem(location)
        fs = fs or fs_i
        if type(fs_i) is not type(fs):
            raise UserError(f"shard locations mix filesystems: {locations}")
        info = fs_i.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"shard location not found: {location}")
        if info.type == pafs.FileType.File:
            paths.append(path)
            continue
        listing = fs_i.get_file_info(pafs.FileSelector(path, recursive=False))
        shards = sorted(i.path for i in listing if SHARD_RE.match(i.base_name))
        if not shards:
            raise UserError(f"no shard-*.tar files in {location}")
        paths.extend(shards)
        manifest_path = f"{path.rstrip('/')}/{MANIFEST_NAME}"
        if manifest is None and fs_i.get_file_info(manifest_path).type == pafs.FileType.File:
            with fs_i.open_input_stream(manifest_path) as f:
                try:
                    manifest = json.loads(f.read())
                except json.JSONDecodeError as exc:
                    raise UserError(f"{manifest_path}: not valid JSON ({exc})") from exc
    return ShardSet(paths=paths, filesystem=fs, manifest=manifest)


def detection_dataset(
    locations: str | list[str] | ShardSet, cfg: DataConfig, *, train: bool
) -> ray.data.Dataset:
    """A Ray Dataset of decoded samples (see :class:`~dinor1.data.transforms.DecodeSample`).

    Decoded in the read tasks, one per shard (``cfg.decode_in_read``; "auto": when there are at
    least as many shards as the cluster has CPUs), else in a ``map_batches`` stage of its own
    whose tasks each take a block of read rows.
    """
    shard_set = locations if isinstance(locations, ShardSet) else open_shard_set(locations)
    shuffle = None
    if train and cfg.shuffle_files:  # with preserve_order: the same file order every epoch, so
        # an attempt restarted mid-run (its first execution) reads what the lost one would have
        shuffle = FileShuffleConfig(seed=cfg.seed, reseed_after_execution=not cfg.preserve_order)
    decode = DecodeSample(
        short_side=max(cfg.train_short_sides) if train else cfg.eval_short_side,
        max_size=cfg.train_max_size if train else cfg.eval_max_size,
        category_ids=shard_set.category_ids,
        keep_crowd=cfg.keep_crowd,
    )
    block_bytes = int(cfg.block_megabytes * 2**20)
    if _decodes_in_read(cfg, len(shard_set.paths)):
        source = ShardDatasource(shard_set.paths, filesystem=shard_set.filesystem,
                                 shuffle=shuffle, decode=decode, block_bytes=block_bytes)
        return _read(source, len(shard_set.paths), block_bytes, num_cpus=cfg.decode_num_cpus,
                     concurrency=cfg.decode_concurrency)
    source = ShardDatasource(shard_set.paths, filesystem=shard_set.filesystem, shuffle=shuffle)
    ds = _read(source, len(shard_set.paths), block_bytes)
    return ds.map_batches(decode, batch_size=cfg.decode_batch_size, batch_format="numpy",
                          num_cpus=cfg.decode_num_cpus, concurrency=cfg.decode_concurrency)


def _decodes_in_read(cfg: DataConfig, num_shards: int) -> bool:
    """Whether the read tasks decode: a read task per shard caps the decode's parallelism at
    the shard count, so "auto" decodes there only when that is no cap on this cluster."""
    if cfg.decode_in_read != "auto":
        return cfg.decode_in_read
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    return num_shards >= cpus


def _read(source: ShardDatasource, num_shards: int, block_bytes: int,
          **read_args) -> ray.data.Dataset:
    """One read task per shard file: the datasource already streams small blocks, and letting
    Ray split reads further (its default on small clusters) halved throughput here."""
    context = ray.data.DataContext.get_current()
    default_block_size = context.target_max_block_size
    context.target_max_block_size = block_bytes
    try:  # a Dataset keeps a copy of the context it was created under
        return ray.data.read_datasource(source, override_num_blocks=num_shards, **read_args)
    finally:
        context.target_max_block_size = default_block_size


def collate_fn(cfg: DataConfig, *, train: bool, epoch: int = 0,
               normalize: bool = True) -> DetectionCollateFn:
    return DetectionCollateFn(
        normalize=normalize,
        train=train,
        short_sides=tuple(cfg.train_short_sides),
        max_size=cfg.train_max_size,
        hflip_prob=cfg.hflip_prob,
        mean=cfg.pixel_mean,
        std=cfg.pixel_std,
        size_divisor=cfg.size_divisor,
        seed=cfg.seed,
        epoch=epoch,
    )


def _normalizes_on_device(cfg: DataConfig, device: Any) -> bool:
    if cfg.normalize_on != "auto":
        return cfg.normalize_on == "device"
    if device == "auto":  # what Ray picks: the Ray Train worker's device, else the CPU
        return ray.is_initialized() and bool(ray.get_gpu_ids())
    return torch.device(device).type != "cpu"


def _resolve_device(device: Any) -> torch.device:
    if device == "auto":  # as Ray's iter_torch_batches: the Train worker's device, else CPU
        from ray.train.torch import get_device
        from ray.train.utils import _in_ray_train_worker

        device = get_device() if _in_ray_train_worker() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # pin "cuda" to this thread's device now
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def move_batch(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``, except the host-side bookkeeping (``HOST_KEYS``)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
            for k, v in batch.items()}


def iter_collated_batches(data, cfg: DataConfig, *, train: bool, epoch: int = 0,
                          device: Any = "auto", normalize: bool = True):
    """Batches of ``cfg.batch_size`` collated by :class:`DetectionCollateFn` from a Ray Dataset
    or ``DataIterator``, moved to ``device``. Whole blocks come from Ray (``prefetch_batches``
    of them fetched ahead), converted to numpy a chunk at a time (:func:`numpy_blocks`) and cut
    into batches by :func:`iter_row_batches`, so each image is copied once, into the padded
    batch; the local shuffle buffer is seeded by (``seed``, ``epoch``). With ``normalize=False`` ``pixel_values`` stay uint8 (see
    :func:`~dinor1.data.collate.normalize_pixels`)."""
    shuffle = train and cfg.local_shuffle_buffer > 0
    collate = collate_fn(cfg, train=train, epoch=epoch, normalize=normalize)
    target = _resolve_device(device)
    blocks = data.iter_batches(batch_size=None, batch_format="pyarrow",
                               prefetch_batches=cfg.prefetch_batches)
    try:
        for rows in iter_row_batches(numpy_blocks(blocks), cfg.batch_size,
                                     shuffle_buffer=cfg.local_shuffle_buffer if shuffle else 0,
                                     seed=[cfg.seed, epoch]):
            batch = collate(rows)
            yield move_batch(batch, target)
    finally:  # ends this epoch's read (a streaming split's coordinator is told) when left early
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def iter_detection_batches(
    data, cfg: DataConfig, *, train: bool, epoch: int = 0, device: Any = "auto"
):
    """Batches from a Ray Dataset or a worker's ``DataIterator`` (``get_dataset_shard``).

    ``device="auto"`` moves tensors to the Ray Train worker's device (inside a worker) and
    leaves them on the CPU elsewhere. ``pixel_values`` are normalised float32 either way; with
    ``cfg.normalize_on`` resolving to "device" they travel as uint8 and are normalised there.
    """
    on_device = _normalizes_on_device(cfg, device)
    batches = iter_collated_batches(data, cfg, train=train, epoch=epoch, device=device,
                                    normalize=not on_device)
    return _normalized(batches, cfg) if on_device else batches


def _normalized(batches, cfg: DataConfig):
    for batch in batches:
        batch["pixel_mask"] = batch["pixel_mask"].long()
        batch["pixel_values"] = normalize_pixels(batch["pixel_values"], batch["pixel_mask"],
                                                 cfg.pixel_mean, cfg.pixel_std)
        yield batch
