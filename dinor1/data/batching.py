"""Decoded Ray Data blocks -> lists of rows of exactly ``batch_size``, each image copied once.

Ray's own batching (``iter_batches(batch_size=N)``, and its local shuffle buffer) concatenates the
tensor columns of the blocks a batch spans, a full copy of every image, before the collate copies
it again into the padded batch (``dinor1 bench data``, consumer CPU per sample: 0.67 -> 0.43 ms
at 384 px, 1.52 -> 0.96-1.03 ms at 640 px). Here batches only hold references to rows of the
blocks (zero-copy views of Ray's object store) and
:class:`~dinor1.data.collate.DetectionCollateFn` makes the one copy into the padded batch.

Blocks are taken from Ray as Arrow tables and turned into numpy one record batch (chunk) at a
time by :func:`numpy_blocks`: Ray's own numpy conversion of a block first concatenates the chunks
of each tensor column (a decoded block is usually made of several decode outputs), which copied
every image again; per chunk the arrays are zero-copy views (``bench/block_conversion.py``:
conversion + collate CPU per sample 0.76-0.82 of Ray's at 384-640 px).

A row batch is ``{column: [value per row]}``, the form the collate takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor

Row = tuple[dict, int]  # (a block as {column: array}, row index)


def _gather(rows: list[Row]) -> dict[str, list]:
    block = rows[0][0]
    return {name: [b[name][i] for b, i in rows] for name in block}


def _draw(pending: list[Row], count: int, rng: np.random.Generator) -> list[Row]:
    """``count`` rows at random from ``pending`` (removed from it; order of the rest is kept
    up to swaps, which is fine for a shuffle buffer)."""
    drawn = []
    for _ in range(count):
        j = int(rng.integers(len(pending)))
        pending[j], pending[-1] = pending[-1], pending[j]
        drawn.append(pending.pop())
    return drawn


def numpy_blocks(tables: Iterable[pa.Table]) -> Iterator[dict[str, np.ndarray]]:
    """Arrow blocks (``iter_batches(batch_size=None, batch_format="pyarrow")``) -> numpy blocks
    in Ray's numpy batch format, one per record batch, so no column's chunks are concatenated:
    tensor columns stay zero-copy (read-only) views of the object store."""
    for table in tables:
        for record_batch in table.to_batches():
            if record_batch.num_rows:
                yield BlockAccessor.for_block(
                    pa.Table.from_batches([record_batch])).to_batch_format("numpy")


def iter_row_batches(blocks: Iterable[dict[str, np.ndarray]], batch_size: int, *,
                     shuffle_buffer: int = 0, seed=None) -> Iterator[dict[str, list]]:
    """Rows of ``blocks`` (numpy-format blocks, as from ``iter_batches(batch_size=None)``) in
    batches of ``batch_size`` (the last one may be smaller).

    With ``shuffle_buffer > 0`` a batch is drawn at random (``np.random.default_rng(seed)``)
    from at least that many buffered rows, as Ray's ``local_shuffle_buffer_size``; the buffer
    keeps references to the rows' blocks, not copies, so up to about ``shuffle_buffer`` blocks
    may stay alive at once.
    """
    rng = np.random.default_rng(seed) if shuffle_buffer > 0 else None
    threshold = max(shuffle_buffer, batch_size)
    pending: list[Row] = []
    for block in blocks:
        if not block:
            continue
        pending.extend((block, i) for i in range(len(next(iter(block.values())))))
        if rng is None:
            while len(pending) >= batch_size:
                yield _gather(pending[:batch_size])
                del pending[:batch_size]
        else:
            while len(pending) >= threshold:
                yield _gather(_draw(pending, batch_size, rng))
    while pending:
        if rng is None:
            yield _gather(pending[:batch_size])
            del pending[:batch_size]
        else:
            yield _gather(_draw(pending, min(batch_size, len(pending)), rng))
