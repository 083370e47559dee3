"""iter_row_batches: exact batch sizes across block boundaries, order kept without a shuffle, a
seeded permutation with one, and rows that are views of the blocks (no copy before the collate);
numpy_blocks: Arrow blocks converted a chunk at a time, images left as views."""

import numpy as np
import pytest

from dinor1.data.batching import iter_row_batches


def _blocks(sizes):
    start, out = 0, []
    for n in sizes:
        images = np.empty(n, dtype=object)
        for i in range(n):
            images[i] = np.full((4, 5, 3), start + i, np.uint8)
        out.append({"key": np.array([str(start + i) for i in range(n)]), "image": images})
        start += n
    return out


@pytest.mark.parametrize("sizes", [[7, 3, 11, 1], [16], [5, 0, 5], []])
def test_in_order_batches_of_exact_size(sizes):
    batches = list(iter_row_batches(_blocks(sizes), 4))
    keys = [k for b in batches for k in b["key"]]
    assert keys == [str(i) for i in range(sum(sizes))]
    assert all(len(b["key"]) == 4 for b in batches[:-1])
    assert not batches or 1 <= len(batches[-1]["key"]) <= 4


def test_rows_are_views_of_the_blocks():
    blocks = _blocks([3, 3])
    batch = next(iter_row_batches(blocks, 4))
    assert np.shares_memory(batch["image"][0], blocks[0]["image"][0])
    assert np.shares_memory(batch["image"][3], blocks[1]["image"][0])
    assert int(batch["image"][3][0, 0, 0]) == 3


def test_shuffle_is_a_seeded_permutation():
    def order(seed):
        return [k for b in iter_row_batches(_blocks([10, 10, 10, 3]), 4, shuffle_buffer=8,
                                            seed=seed) for k in b["key"]]

    first = order([0, 1])
    assert sorted(first, key=int) == [str(i) for i in range(33)]
    assert first == order([0, 1])  # the same seed and epoch: the same order
    assert first != order([0, 2])  # another epoch: another order
    assert first != [str(i) for i in range(33)]


def test_numpy_blocks_keeps_chunks_apart_and_images_zero_copy():
    """A multi-chunk Arrow block becomes one numpy block per chunk, every row in order, the
    tensor column a view of the Arrow buffers (Ray's own conversion concatenates the chunks)."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from dinor1.data.batching import numpy_blocks

    chunks = [BlockAccessor.batch_to_block(b) for b in _blocks([3, 5])]
    table = pa.concat_tables(chunks)
    assert table["image"].num_chunks == 2
    blocks = list(numpy_blocks([table, table.slice(0, 0)]))
    assert [len(b["key"]) for b in blocks] == [3, 5]
    assert [k for b in blocks for k in b["key"]] == [str(i) for i in range(8)]
    image = blocks[1]["image"][2]
    assert image.shape == (4, 5, 3) and int(image[0, 0, 0]) == 5
    arrow_data = table["image"].chunks[1].storage.buffers()[-1]
    assert np.shares_memory(image, np.frombuffer(arrow_data, np.uint8))
    rows = [k for b in iter_row_batches(numpy_blocks([table]), 4) for k in b["key"]]
    assert rows == [str(i) for i in range(8)]


def test_moving_a_batch_keeps_the_host_bookkeeping_on_the_cpu():
    """The quality counters and image ids are read on the host every step: moved to a GPU they
    would be copied there and read back (a sync each). ``meta`` stands in for the GPU."""
    import torch

    from dinor1.data.collate import HOST_KEYS
    from dinor1.data.pipeline import move_batch

    batch = {"pixel_values": torch.zeros(1, 3, 4, 4), "boxes": torch.zeros(0, 4),
             "orig_sizes": torch.tensor([[4, 4]]), "image_ids": torch.tensor([7]),
             "skipped_by_kind": torch.zeros(3, dtype=torch.int64), "note": "kept"}
    moved = move_batch(batch, torch.device("meta"))
    assert {k for k, v in moved.items() if isinstance(v, torch.Tensor) and v.is_meta} == {
        "pixel_values", "boxes", "orig_sizes"}
    assert moved["image_ids"].device.type == "cpu" and moved["note"] == "kept"
    assert {"image_ids", "skipped_by_kind", "skipped_errors"} <= HOST_KEYS
    assert move_batch(batch, torch.device("cpu")) is batch
