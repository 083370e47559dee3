"""Shards -> Ray Data -> batches, on a real local Ray cluster."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dinor1.config import DataConfig
from dinor1.data.collate import DetectionCollateFn, split_targets
from dinor1.data.pipeline import detection_dataset, iter_detection_batches, open_shard_set
from dinor1.data.quality import decode_errors
from dinor1.data_pipelines.converters import load_coco
from dinor1.data_pipelines.shard_writer import write_shards
from dinor1.errors import UserError
from tests.helpers import make_coco, write_image, write_tar

CFG = dict(batch_size=4, train_short_sides=[32, 40, 48], train_max_size=96, eval_short_side=48,
           eval_max_size=96, local_shuffle_buffer=8)


def _shards(tmp_path: Path, num_images: int, per_shard: int = 6) -> Path:
    ann, images, _ = make_coco(tmp_path / "src", num_images=num_images)
    write_shards(load_coco(ann, images), tmp_path / "shards", samples_per_shard=per_shard,
                 progress=False)
    return tmp_path / "shards"


def _corrupt_shard(path: Path, tmp_path: Path) -> None:
    """shard with 2 good samples and 4 bad ones: garbage image, invalid JSON, no image member,
    and a NaN box (the sample is kept, the box dropped)."""
    img = write_image(tmp_path / "ok.jpg", 64, 48, seed=7)

    def meta(image_id, box=(2, 2, 10, 10)):
        return json.dumps({"image_id": image_id, "width": 64, "height": 48, "annotations": [
            {"id": image_id, "bbox": list(box), "category_id": 1, "iscrowd": 0}]}).encode()

    write_tar(path, [
        ("g1.jpg", img), ("g1.json", meta(901)),
        ("b1.jpg", b"\xff\xd8 garbage bytes"), ("b1.json", meta(902)),
        ("b2.jpg", img), ("b2.json", b"{not json"),
        ("b3.json", meta(903)),
        ("g2.jpg", img), ("g2.json", meta(904, box=(1, float("nan"), 5, 5))),
    ])


def test_collate_shapes_flip_and_determinism():
    rows = {
        "key": np.array(["a", "b", "bad"], dtype=object),
        "error": np.array(["", "", "broken"], dtype=object),
        "image": np.array([np.full((40, 60, 3), 128, np.uint8), np.zeros((30, 20, 3), np.uint8),
                           np.zeros((1, 1, 3), np.uint8)], dtype=object),
        "boxes": np.array([np.array([[0.25, 0.5, 0.1, 0.2]], np.float32),
                           np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)],
                          dtype=object),
        "labels": np.array([np.array([3]), np.zeros(0, np.int64), np.zeros(0, np.int64)],
                           dtype=object),
        "image_id": np.array([1, 2, -1]),
        "orig_size": np.array([[40, 60], [30, 20], [0, 0]]),
        "dropped_boxes": np.array([0, 1, 0]),
    }
    flip = DetectionCollateFn(train=True, short_sides=(40,), max_size=100, hflip_prob=1.0)
    out = flip(rows)
    assert out["pixel_values"].shape == (2, 3, 40, 60) and out["num_skipped"] == 1
    assert out["pixel_mask"][1].sum() == 30 * 20 and out["pixel_mask"][0].sum() == 40 * 60
    assert out["sizes"].tolist() == [[40, 60], [30, 20]]  # never upscaled
    assert torch.allclose(out["boxes"][0], torch.tensor([0.75, 0.5, 0.1, 0.2]))
    assert out["dropped_boxes"] == 1 and out["num_boxes"].tolist() == [1, 0]
    assert [t["class_labels"].tolist() for t in split_targets(out)] == [[3], []]
    multi = DetectionCollateFn(train=True, short_sides=(10, 20, 30), max_size=100, seed=3)
    assert torch.equal(multi(rows)["pixel_values"], multi(rows)["pixel_values"])
    other_epoch = DetectionCollateFn(train=True, short_sides=(10, 20, 30), max_size=100, seed=3,
                                     epoch=1)
    sizes = {tuple(c(rows)["sizes"][0].tolist()) for c in (multi, other_epoch)}
    assert all(s[0] in (10, 20, 30) for s in sizes)


def _random_rows(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = [(40, 60), (48, 36), (37, 50)]
    images = np.empty(len(sizes), dtype=object)
    for i, (h, w) in enumerate(sizes):
        images[i] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images[i].setflags(write=False)  # as Ray hands them over
    boxes = np.empty(len(sizes), dtype=object)
    labels = np.empty(len(sizes), dtype=object)
    for i in range(len(sizes)):
        boxes[i] = np.array([[0.5, 0.5, 0.2, 0.3]], np.float32)
        labels[i] = np.array([1])
    return {"key": np.array(["a", "b", "c"], dtype=object), "error": np.array(["", "", ""]),
            "image": images, "boxes": boxes, "labels": labels, "image_id": np.array([1, 2, 3]),
            "orig_size": np.array(sizes), "dropped_boxes": np.zeros(3, np.int64)}


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batches_normalised_later_equal_collate_normalised(train):
    """``normalize_on: device`` sends uint8 pixels + a bool mask and normalises after the move:
    exactly the floats (padding included) the collate's own normalisation gives."""
    from dinor1.data.collate import normalize_pixels

    kw = dict(train=train, short_sides=(24, 32), max_size=64, size_divisor=8, seed=3)
    floats = DetectionCollateFn(**kw)(_random_rows())
    raw = DetectionCollateFn(normalize=False, **kw)(_random_rows())
    assert raw["pixel_values"].dtype == torch.uint8 and raw["pixel_mask"].dtype == torch.bool
    assert floats["pixel_values"].dtype == torch.float32
    assert floats["pixel_mask"].dtype == torch.int64
    torch.testing.assert_close(raw["pixel_mask"].long(), floats["pixel_mask"], rtol=0, atol=0)
    normalised = normalize_pixels(raw["pixel_values"], raw["pixel_mask"])
    assert normalised.is_contiguous()
    torch.testing.assert_close(normalised, floats["pixel_values"], rtol=0, atol=0)
    assert floats["pixel_values"][floats["pixel_mask"][:, None].expand(-1, 3, -1, -1) == 0].eq(
        0).all()
    torch.testing.assert_close(raw["boxes"], floats["boxes"])  # same flips and scales


def test_where_pixels_are_normalised():
    from dinor1.data.pipeline import _normalizes_on_device

    auto = DataConfig()
    assert not _normalizes_on_device(auto, "cpu") and _normalizes_on_device(auto, "cuda:0")
    assert not _normalizes_on_device(auto, "auto")  # no Ray Train GPU worker here
    assert _normalizes_on_device(DataConfig(normalize_on="device"), "cpu")
    assert not _normalizes_on_device(DataConfig(normalize_on="collate"), "cuda")


def test_uint8_resize_is_within_one_level_of_the_float_resize():
    import torch.nn.functional as F

    rows = _random_rows(1)
    collate = DetectionCollateFn(train=True, short_sides=(20,), max_size=64, hflip_prob=0.0,
                                 normalize=False)
    out = collate(rows)
    for b, image in enumerate(rows["image"]):
        h, w = out["sizes"][b].tolist()
        chw = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
        expect = F.interpolate(chw, size=(h, w), mode="bilinear", antialias=True)[0]
        expect = expect.round().clamp(0, 255)
        got = out["pixel_values"][b, :, :h, :w].float()
        assert (got - expect).abs().max() <= 1


def test_config_errors_name_the_key():
    from dinor1.config import apply_overrides, validate

    with pytest.raises(UserError, match="'data.batch_sise': unknown key"):
        validate(DataConfig, apply_overrides({}, ["batch_sise=3"]), prefix="data")
    with pytest.raises(UserError, match="'data.batch_size'"):
        validate(DataConfig, {"batch_size": 0}, prefix="data")
    with pytest.raises(UserError, match="'data.hflip_prob'"):
        validate(DataConfig, apply_overrides({}, ["hflip_prob=2"]), prefix="data")
    assert validate(DataConfig, apply_overrides({}, ["train_short_sides=[64, 96]"])) \
        .train_short_sides == [64, 96]


def test_missing_location_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_shard_set(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no shard-"):
        open_shard_set(str(tmp_path / "empty"))


@pytest.mark.ray
def test_corrupt_samples_are_skipped_and_counted(ray_cluster, tmp_path):
    shards = _shards(tmp_path, num_images=10, per_shard=5)
    _corrupt_shard(shards / "shard-000002.tar", tmp_path)
    cfg = DataConfig(**CFG)
    ds = detection_dataset(str(shards), cfg, train=True)
    ids, skipped, dropped = [], 0, 0
    for batch in iter_detection_batches(ds, cfg, train=True, device="cpu"):
        ids += batch["image_ids"].tolist()
        skipped += int(batch["num_skipped"])
        dropped += int(batch["dropped_boxes"])
        assert batch["pixel_values"].shape[-1] <= 96
        assert torch.isfinite(batch["boxes"]).all()
    assert sorted(ids) == list(range(1, 11)) + [901, 904]
    assert skipped == 3 and dropped == 1


@pytest.mark.ray
def test_device_normalisation_and_block_size(ray_cluster, tmp_path):
    """The same batches whichever side normalises; the dataset's block size is set without
    changing Ray's global default."""
    import ray

    shards = _shards(tmp_path, num_images=12, per_shard=6)
    default_block = ray.data.DataContext.get_current().target_max_block_size
    by_mode = {}
    for mode in ("collate", "device"):
        cfg = DataConfig(**{**CFG, "normalize_on": mode, "shuffle_files": False,
                            "local_shuffle_buffer": 0, "preserve_order": True,
                            "block_megabytes": 0.5})
        ds = detection_dataset(str(shards), cfg, train=True)
        assert ds.context.target_max_block_size == 2**19
        ds.context.execution_options.preserve_order = True
        by_mode[mode] = list(iter_detection_batches(ds, cfg, train=True, device="cpu"))
    assert ray.data.DataContext.get_current().target_max_block_size == default_block
    assert len(by_mode["collate"]) == len(by_mode["device"]) == 3
    for a, b in zip(by_mode["collate"], by_mode["device"]):
        assert b["pixel_values"].dtype == torch.float32 and b["pixel_mask"].dtype == torch.int64
        assert a["image_ids"].tolist() == b["image_ids"].tolist()
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
        torch.testing.assert_close(a["pixel_mask"], b["pixel_mask"], rtol=0, atol=0)


@pytest.mark.ray
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_decoding_in_the_read_tasks_gives_the_map_stage_batches(ray_cluster, tmp_path, train):
    """The same batches, corrupt samples skipped and counted alike, wherever the decode runs."""
    shards = _shards(tmp_path, num_images=15, per_shard=5)
    _corrupt_shard(shards / "shard-000001.tar", tmp_path)
    by_stage = {}
    for in_read in (True, False):
        cfg = DataConfig(**{**CFG, "decode_in_read": in_read, "shuffle_files": False,
                            "local_shuffle_buffer": 0, "preserve_order": True})
        ds = detection_dataset(str(shards), cfg, train=train)
        assert ("MapBatches" in str(ds)) != in_read  # one operator when the read decodes
        ds.context.execution_options.preserve_order = True
        by_stage[in_read] = list(iter_detection_batches(ds, cfg, train=train, device="cpu"))
    assert sum(int(b["num_skipped"]) for b in by_stage[True]) == 3
    assert len(by_stage[True]) == len(by_stage[False]) == 4  # 16 rows, 3 of them skipped
    for a, b in zip(by_stage[True], by_stage[False]):
        assert a.keys() == b.keys()
        for key in a.keys() - {"skipped_errors"}:
            assert torch.equal(a[key], b[key]), key
        # PIL's message names the address of the BytesIO it was given
        assert ([re.sub(r" at 0x[0-9a-f]+", "", e) for e in decode_errors(a["skipped_errors"])]
                == [re.sub(r" at 0x[0-9a-f]+", "", e) for e in decode_errors(b["skipped_errors"])])


@pytest.mark.ray
def test_file_uri_and_eval_mode(ray_cluster, tmp_path):
    shards = _shards(tmp_path, num_images=5)
    cfg = DataConfig(**CFG)
    ds = detection_dataset(shards.resolve().as_uri(), cfg, train=False)
    batches = list(iter_detection_batches(ds, cfg, train=False, device="cpu"))
    assert sum(len(b["image_ids"]) for b in batches) == 5
    assert all(b["sizes"][:, 0].eq(48).all() for b in batches)  # fixed eval resize (64x48 in)


def _coverage_loop(config):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    cfg = DataConfig(**config["data"])
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(2):
        ids = [i for b in iter_detection_batches(shard, cfg, train=True, epoch=epoch)
               for i in b["image_ids"].tolist()]
        Path(config["out"], f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(ids))


@pytest.mark.ray
@pytest.mark.slow
def test_trainer_workers_get_disjoint_shards_covering_the_epoch(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    shards = _shards(tmp_path, num_images=24, per_shard=4)
    cfg = DataConfig(**CFG)
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        _coverage_loop,
        train_loop_config={"data": cfg.model_dump(), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={"train": detection_dataset(str(shards), cfg, train=True)},
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="coverage"),
    )
    trainer.fit()
    for epoch in range(2):
        a = json.loads((out / f"rank0-epoch{epoch}.json").read_text())
        b = json.loads((out / f"rank1-epoch{epoch}.json").read_text())
        assert a and b and not set(a) & set(b)
        assert sorted(a + b) == list(range(1, 25))


@pytest.mark.parametrize("short_side", [40, 20])  # as decoded, and resized first
def test_flip_of_read_only_rows_equals_a_plain_flip(short_side):
    """Rows from Ray's object store are read-only views: the collate accepts them as they are,
    and its flip (done in HWC order) is the plain horizontal flip of the pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    view = np.frombuffer(pixels.tobytes(), np.uint8).reshape(pixels.shape)
    assert not view.flags.writeable
    rows = {"key": np.array(["a"]), "error": np.array([""], dtype=object), "image": [view],
            "boxes": [np.array([[0.25, 0.5, 0.1, 0.2]], np.float32)],
            "labels": [np.array([3])], "image_id": np.array([1]),
            "orig_size": np.array([[40, 60]]), "dropped_boxes": np.array([0])}
    kwargs = dict(train=True, short_sides=(short_side,), max_size=100, normalize=False)
    flipped = DetectionCollateFn(hflip_prob=1.0, **kwargs)(rows)["pixel_values"][0]
    kept = DetectionCollateFn(hflip_prob=0.0, **kwargs)(rows)["pixel_values"][0]
    assert flipped.shape == (3, short_side, short_side * 3 // 2)
    assert torch.equal(flipped, kept.flip(-1))
    if short_side == 40:
        assert torch.equal(kept, torch.from_numpy(pixels).permute(2, 0, 1))
