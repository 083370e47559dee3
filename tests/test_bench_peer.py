"""The DataLoader peer of the data benchmark does the pipeline's work (same samples, same
collated tensors), and the peer comparison prints a ratio that is the quotient of its rates."""

import re

import pytest
import torch

from dinor1.bench.data_peer import peer_loader, run_peer_benchmark
from dinor1.bench.data_throughput import DataBenchOptions, synthetic_jpeg_shards
from dinor1.config import DataConfig
from dinor1.data.datasource import iter_shard_rows
from dinor1.data.pipeline import collate_fn, open_shard_set
from dinor1.data.transforms import DecodeSample


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """32 synthetic 64 px JPEGs in 4 shards of 8."""
    work = tmp_path_factory.mktemp("peer")
    return open_shard_set(synthetic_jpeg_shards(work, 32, 64, 8, 1))


def _single_process_batches(shard_set, cfg, normalize):
    """Read, decode and collate shard by shard in this process, no shuffling."""
    decode = DecodeSample(max(cfg.train_short_sides), cfg.train_max_size, shard_set.category_ids)
    collate = collate_fn(cfg, train=True, normalize=normalize)
    batches = []
    for path in shard_set.paths:
        with shard_set.filesystem.open_input_stream(path) as f:
            rows = [decode.decode_row(row) for row in iter_shard_rows(f, path)]
        for i in range(0, len(rows), cfg.batch_size):
            chunk = rows[i:i + cfg.batch_size]
            batches.append(collate({k: [r[k] for r in chunk] for k in chunk[0]}))
    return batches


@pytest.mark.parametrize("normalize", [False, True], ids=["uint8", "float"])
def test_dataloader_peer_yields_the_single_process_batches(shard_set, normalize):
    # batches of 4 never span two shards of 8, so both sides form the same batches
    cfg = DataConfig(batch_size=4, train_short_sides=[48], train_max_size=1333,
                     shuffle_files=False, local_shuffle_buffer=0, hflip_prob=0.5)
    expected = {tuple(b["image_ids"].tolist()): b
                for b in _single_process_batches(shard_set, cfg, normalize)}
    loader = peer_loader(shard_set, cfg, normalize=normalize, num_workers=2)
    got = {tuple(b["image_ids"].tolist()): b for b in loader}
    del loader  # its worker processes end with it
    ids = [i for key in got for i in key]
    assert len(ids) == len(set(ids)) == 32
    assert got.keys() == expected.keys()
    for key, batch in got.items():
        assert batch.keys() == expected[key].keys()
        for name, value in batch.items():
            assert value.dtype == expected[key][name].dtype, name
            assert torch.equal(value, expected[key][name]), (key, name)
    assert got[next(iter(got))]["pixel_values"].dtype == (torch.float32 if normalize
                                                          else torch.uint8)


@pytest.mark.ray
@pytest.mark.slow
def test_peer_comparison_prints_both_rates_and_their_quotient(ray_cluster, tmp_path, capsys):
    options = DataBenchOptions(num_images=32, image_size=64, num_cpus=2, batch_size=4,
                               repeats=1, work_dir=str(tmp_path))
    result = run_peer_benchmark(options, forms=("uint8",))
    out = capsys.readouterr().out
    figures = result["uint8"]
    ray_rate = figures["ray"]["samples_per_s"]
    loader_rate = figures["dataloader"]["samples_per_s"]
    assert result["samples"] == 32
    assert ray_rate > 0 and loader_rate > 0
    assert figures["ratio"] == ray_rate / loader_rate
    printed = re.search(r"ray / dataloader\s+([0-9.]+)x", out)
    assert printed, out
    assert float(printed.group(1)) == pytest.approx(ray_rate / loader_rate, abs=0.005)
    assert "DataLoader, 2 workers" in out and "Ray Data pipeline, 2 CPU" in out
