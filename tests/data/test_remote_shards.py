"""Shards read from an s3:// URI through pyarrow's S3 filesystem, as Ray Data does.

The object store is a real S3-compatible server (moto's, on 127.0.0.1) standing in for the cloud,
which cannot exist here; everything on our side (URI parsing, listing, manifest, Ray Data reads,
inspect) is the production code path.
"""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from data_pipelines.converters import load_coco
from data_pipelines.shard_writer import write_shards
from dinor1.config import DataConfig
from dinor1.data.inspect import inspect_shards
from dinor1.data.pipeline import detection_dataset, iter_detection_batches, open_shard_set
from tests.helpers import make_coco


@pytest.fixture
def s3_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("S3 test server did not start")
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
