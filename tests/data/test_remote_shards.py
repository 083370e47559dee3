"""Shards read from an s3:// URI through pyarrow's S3 filesystem, as Ray Data does.

The object store is a real S3-compatible server (moto's, on 127.0.0.1) standing in for the cloud,
which cannot exist here; everything on our side (URI parsing, listing, manifest, Ray Data reads,
inspect) is the production code path.
"""


import pyarrow.fs as pafs
import pytest

from dinor1.config import DataConfig
from dinor1.data.inspect import inspect_shards
from dinor1.data.pipeline import detection_dataset, iter_detection_batches, open_shard_set
from dinor1.data_pipelines.converters import load_coco
from dinor1.data_pipelines.shard_writer import write_shards
from tests.helpers import make_coco


@pytest.fixture
def s3_endpoint(s3_server):
    yield f"endpoint_override=127.0.0.1:{s3_server}&scheme=http&region=us-east-1"


@pytest.mark.ray
def test_shards_from_s3_uri(ray_cluster, tmp_path, s3_endpoint):
    ann, images, _ = make_coco(tmp_path / "src", num_images=7)
    write_shards(load_coco(ann, images), tmp_path / "shards", samples_per_shard=3, progress=False)
    uri = f"s3://key:secret@bucket/train?{s3_endpoint}&allow_bucket_creation=true"
    fs, _ = pafs.FileSystem.from_uri(uri)
    fs.create_dir("bucket")
    pafs.copy_files(str(tmp_path / "shards"), "bucket/train",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    shard_set = open_shard_set(uri)
    assert len(shard_set.paths) == 3 and shard_set.category_ids == [1, 2, 5]
    cfg = DataConfig(batch_size=4, train_short_sides=[32], train_max_size=64)
    ds = detection_dataset(shard_set, cfg, train=True)
    ids = [i for b in iter_detection_batches(ds, cfg, train=True, device="cpu")
           for i in b["image_ids"].tolist()]
    assert sorted(ids) == list(range(1, 8))
    report = inspect_shards(uri)
    assert report["num_samples"] == 7 and not report["checksum_failures"]
    assert all(s["sha256_ok"] for s in report["shards"])
