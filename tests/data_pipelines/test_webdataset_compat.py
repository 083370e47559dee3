"""Our shards are WebDataset tar files: the `webdataset` library itself (a dev dependency only;
dinor1 reads shards with its own reader) reads back the samples our shard writer wrote, with the
same keys and the same member bytes as dinor1's reader."""

import json

import pytest
import webdataset as wds

from dinor1.data.datasource import iter_shard_rows
from dinor1.data_pipelines.converters import load_coco
from dinor1.data_pipelines.shard_writer import write_shards
from tests.helpers import make_coco, write_image


# webdataset leaves its tar streams for the garbage collector to close
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_webdataset_reads_our_shards(tmp_path):
    ann, images, _ = make_coco(tmp_path / "src", num_images=7)
    write_image(images / "0003.jpg", 64, 48, seed=3, fmt="PNG")  # kept as a .png member
    out = tmp_path / "shards"
    manifest = write_shards(load_coco(ann, images), out, samples_per_shard=3, progress=False)
    shards = [str(out / e["name"]) for e in manifest["shards"]]
    assert len(shards) == 3

    ours = {}
    for shard in shards:
        with open(shard, "rb") as f:
            for row in iter_shard_rows(f, shard):
                assert not row["error"]
                ours[row["__key__"]] = {row["ext"]: row["image"], "json": row["json"]}

    theirs = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert sample["__key__"] not in theirs
        theirs[sample["__key__"]] = members

    assert list(theirs) == list(ours) == sorted(ours)  # shard order, then key order
    assert theirs == ours
    assert sorted({ext for members in theirs.values() for ext in members}) == [
        "jpg", "json", "png"]
    ids = sorted(json.loads(members["json"])["image_id"] for members in theirs.values())
    assert ids == list(range(1, 8)) and manifest["num_samples"] == 7
