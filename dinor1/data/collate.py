"""Collate decoded rows into padded detection batches on the training worker.

Called on the row batches of :func:`~dinor1.data.batching.iter_row_batches` (see
:func:`~dinor1.data.pipeline.iter_collated_batches`) inside a Ray Train worker, on the iterator
from ``ray.train.get_dataset_shard``, or on any Ray Dataset; it is also a ``NumpyBatchCollateFn``,
so Ray's ``iter_torch_batches(collate_fn=...)`` takes it as it is.
"""

from __future__ import annotations

import functools
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn

from dinor1.config import IMAGENET_MEAN, IMAGENET_STD
from dinor1.data.quality import DROP_RULES, count_kinds, encode_errors
from dinor1.data.transforms import resized_hw

# batch keys read only on the host (counted, logged, listed): they stay on the CPU when the rest
# of a batch moves to a GPU
HOST_KEYS = frozenset({"image_ids", "num_skipped", "dropped_boxes", "skipped_by_kind",
                       "dropped_by_rule", "clipped_boxes", "skipped_errors"})

# Rows from Ray's object store are read-only views; the collate only reads them (every image is
# copied into the padded batch), so torch's one-time warning about wrapping them is noise here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning, module=r"dinor1\.data\.collate")


class DetectionCollateFn(NumpyBatchCollateFn):
    """Rows -> one batch of tensors; skipped rows (``error`` set) are dropped and counted.

    Train mode: each image is resized so its short side is a random choice of ``short_sides``
    (long side at most ``max_size``; never upscaled past what the decode step produced), then
    flipped horizontally with probability ``hflip_prob``. The randomness is seeded from
    (``seed``, ``epoch``, the batch's keys), so it is reproducible whatever thread runs the
    collate. Eval mode: images are used as decoded.

    Returns a dict of tensors (so Ray can move it to the training device)::

        pixel_values    float32 [B, 3, H, W]  normalised, zero-padded to the largest image
                                              (``normalize=False``: uint8, for
                                              :func:`normalize_pixels` on the device)
        pixel_mask      int64   [B, H, W]     1 on real pixels, 0 on padding
                                              (``normalize=False``: bool)
        boxes           float32 [N, 4]        all images' boxes, normalised cx, cy, w, h
        class_labels    int64   [N]           dataset category ids
        num_boxes       int64   [B]           boxes per image (split ``boxes`` with it)
        image_ids       int64   [B]
        orig_sizes      int64   [B, 2]        (height, width) of the stored images
        sizes           int64   [B, 2]        (height, width) after resizing, before padding
        num_skipped     int64   []            rows of this batch skipped as corrupt
        dropped_boxes   int64   []            annotations dropped by the cleaning rules
        skipped_by_kind int64   [K]           skipped rows by kind (``quality.SKIP_KINDS``)
        dropped_by_rule int64   [R]           dropped annotations by rule (``DROP_RULES``)
        clipped_boxes   int64   []            boxes clipped to their image (kept)
        skipped_errors  uint8   [L]           the skipped rows' errors, UTF-8, one per line
                                              (``quality.decode_errors``; empty when none)

    :class:`~dinor1.data.quality.QualityCounter` sums the last five over batches and ranks.
    The keys in :data:`HOST_KEYS` (bookkeeping read on the host) stay on the CPU when a batch
    moves to a GPU: each would otherwise be copied there and read back every step.

    ``B`` may be 0 when every row of a batch was corrupt; training loops skip such batches.
    """

    def __init__(
        self,
        *,
        train: bool,
        short_sides: tuple[int, ...] = (800,),
        max_size: int = 1333,
        hflip_prob: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        size_divisor: int = 1,
        seed: int = 0,
        epoch: int = 0,
        normalize: bool = True,
    ):
        super().__init__()
        self.normalize = normalize
        self.train, self.short_sides, self.max_size = train, tuple(short_sides), max_size
        self.hflip_prob, self.size_divisor = hflip_prob, size_divisor
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        errors = [str(e) for e in batch["error"]]
        keep = [i for i, e in enumerate(errors) if not e]
        keys = "|".join(str(batch["key"][i]) for i in keep)
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(keys.encode())])
        images, boxes_list = [], []
        for i in keep:
            # read-only views of Ray's object store are used as they are (never written to)
            pixels = np.require(batch["image"][i], np.uint8, ["C"])
            # uint8 [3, H, W] over the HWC memory (channels-last strides): torch's uint8
            # antialiased resize is fastest on exactly this layout
            image = torch.from_numpy(pixels).permute(2, 0, 1)
            boxes = torch.from_numpy(np.array(batch["boxes"][i], np.float32).reshape(-1, 4))
            if self.train:
                image, boxes = self._augment(image, boxes, rng)
            images.append(image)
            boxes_list.append(boxes)
        # a uint8 batch's mask travels as bool (8x smaller) and becomes int64 on the device
        pixel_values, pixel_mask = self._pad(images, torch.int64 if self.normalize else torch.bool)
        if self.normalize:
            pixel_values = normalize_pixels(pixel_values, pixel_mask, self.mean, self.std)
        labels = [torch.from_numpy(np.array(batch["labels"][i], np.int64)) for i in keep]
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "boxes": torch.cat(boxes_list) if keep else torch.zeros(0, 4),
            "class_labels": torch.cat(labels) if keep else torch.zeros(0, dtype=torch.int64),
            "num_boxes": torch.tensor([len(b) for b in boxes_list], dtype=torch.int64),
            "image_ids": torch.tensor([int(batch["image_id"][i]) for i in keep], dtype=torch.int64),
            "orig_sizes": torch.tensor(
                np.array([batch["orig_size"][i] for i in keep], np.int64).reshape(-1, 2)
            ),
            "sizes": torch.tensor([list(im.shape[-2:]) for im in images],
                                  dtype=torch.int64).reshape(-1, 2),
            "num_skipped": torch.tensor(len(errors) - len(keep), dtype=torch.int64),
            "dropped_boxes": torch.tensor(int(np.sum(batch["dropped_boxes"])), dtype=torch.int64),
            **_quality_counts(batch, [e for e in errors if e]),
        }

    def _augment(self, image: torch.Tensor, boxes: torch.Tensor, rng: np.random.Generator):
        height, width = image.shape[-2:]
        short = int(rng.choice(self.short_sides))
        new_h, new_w = resized_hw(height, width, short, self.max_size)
        if new_h < height:  # normalised boxes are unchanged by resizing
            # on uint8 directly: ~8x faster than through float32 at 800 px, within 1 level
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                                  antialias=True)[0]
        if rng.random() < self.hflip_prob:  # flipped in HWC order: ~4x faster on this layout
            image = image.permute(1, 2, 0).flip(1).permute(2, 0, 1)
            boxes = boxes.clone()
            boxes[:, 0] = 1.0 - boxes[:, 0]
        return image, boxes

    def _pad(self, images: list[torch.Tensor], mask_dtype: torch.dtype = torch.int64
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [3, h, w] images -> uint8 [B, 3, H, W] (zero padding, channels-last memory:
        each image row is one contiguous copy) + mask [B, H, W] (1 on real pixels)."""
        if not images:
            return (torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
                    torch.zeros(0, 1, 1, dtype=mask_dtype))
        div = self.size_divisor
        height = -(-max(i.shape[1] for i in images) // div) * div
        width = -(-max(i.shape[2] for i in images) // div) * div
        padded = torch.empty(len(images), height, width, 3, dtype=torch.uint8)
        pixel_mask = torch.zeros(len(images), height, width, dtype=mask_dtype)
        for b, image in enumerate(images):
            h, w = image.shape[1:]
            padded[b, :h, :w] = image.permute(1, 2, 0)
            padded[b, h:] = 0
            padded[b, :h, w:] = 0
            pixel_mask[b, :h, :w] = 1
        return padded.permute(0, 3, 1, 2), pixel_mask


@functools.lru_cache(maxsize=16)
def _normalisation_constants(mean: tuple, std: tuple, device: torch.device):
    """[1, 3, 1, 1] mean and 1/std in uint8 units on ``device``, made once (not per batch: on a
    GPU each would be a host-to-device copy)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return mean_t, 1.0 / std_t


def normalize_pixels(pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any memory layout) -> contiguous normalised float32 [B, 3, H, W] on
    the same device, 0 where ``pixel_mask`` [B, H, W] is 0 (padding). The collate's own
    normalisation is this function, so batches normalised on the device are identical to
    batches normalised in the collate. A float input is returned as it is."""
    if pixel_values.is_floating_point():
        return pixel_values
    mean_t, inv_std = _normalisation_constants(tuple(mean), tuple(std), pixel_values.device)
    out = pixel_values.to(torch.float32, memory_format=torch.contiguous_format)
    out.sub_(mean_t).mul_(inv_std)
    return out.masked_fill_(pixel_mask[:, None] == 0, 0.0)


def _quality_counts(batch: dict[str, np.ndarray], errors: list[str]) -> dict[str, torch.Tensor]:
    """Per-kind, per-rule and clipped counts of a batch; rows built without the per-rule
    columns (single-image prediction) count nothing there."""
    rules = len(DROP_RULES)
    dropped = np.zeros(rules, np.int64)
    if "dropped_by_rule" in batch:
        dropped = np.array(list(batch["dropped_by_rule"]), np.int64).reshape(-1, rules).sum(0)
    clipped = int(np.sum(batch["clipped_boxes"])) if "clipped_boxes" in batch else 0
    return {
        "skipped_by_kind": torch.tensor(count_kinds(errors), dtype=torch.int64),
        "dropped_by_rule": torch.from_numpy(dropped),
        "clipped_boxes": torch.tensor(clipped, dtype=torch.int64),
        "skipped_errors": encode_errors(errors),
    }


def split_targets(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-image targets in the Hugging Face / DETR convention: ``[{"class_labels", "boxes"}]``."""
    counts = batch["num_boxes"].tolist()
    return [
        {"class_labels": labels, "boxes": boxes}
        for labels, boxes in zip(
            batch["class_labels"].split(counts), batch["boxes"].split(counts)
        )
    ]
