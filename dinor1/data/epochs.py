"""Batches of consecutive epochs, the next epoch started while this one's last batches train.

Each epoch of a worker's ``DataIterator`` is a new Ray Data execution: the split coordinator
waits for every worker at a barrier, builds a new streaming executor, and the first block must
be read and decoded before the first batch exists. On the 2-core test machine that is ~0.45 s
per epoch, a fixed stall that made 7% of a 40-step epoch. :class:`EpochBatches` pulls batches
in a background thread, ``lookahead`` batches ahead of the training loop; once the thread has
pulled an epoch's last batch (or as many as the loop may use, see ``limit``) it starts the next
epoch's execution while the loop still trains on what is buffered::

    epochs = EpochBatches(lambda e: iter_detection_batches(shard, cfg, train=True, epoch=e),
                          range(start_epoch, num_epochs), lookahead=4, limit=cap)
    for epoch in range(start_epoch, num_epochs):
        for batch in epochs.batches(epoch):
            ...              # epochs.extend(epoch) for a batch that did not count (skipped)
    epochs.close()

What each epoch yields is unchanged: the same iterator, called with the same epoch number, in
the same order (one execution per epoch, as without lookahead). With ``lookahead=0`` the
batches are pulled on the caller's thread, exactly as a plain loop over the iterators.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()  # closes an epoch in the queue


class EpochBatches:
    """Args:
        make_batches: epoch -> an iterable of that epoch's batches (called once per epoch, in
            order, on the background thread).
        epochs: the epochs to produce, in order.
        lookahead: batches buffered ahead of the consumer (the overlap with the next epoch's
            start is the time the consumer spends on these); 0 = no thread.
        limit: at most this many batches are pulled from an epoch (``stages.max_steps_per_epoch``
            for a capped epoch), raised by one with each :meth:`extend`; None = the whole epoch.
    """

    def __init__(self, make_batches: Callable[[int], Iterable[Any]], epochs: Iterable[int], *,
                 lookahead: int, limit: int | None = None) -> None:
        self._make, self._epochs = make_batches, list(epochs)
        self._limit = limit
        self._extra: dict[int, int] = {}  # epoch -> batches the consumer did not count
        self._left: set[int] = set()  # epochs the consumer has left: pull no more of them
        self._error: BaseException | None = None  # raised by the thread, re-raised here
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(lookahead, 1))
        self._thread = None
        if lookahead > 0 and self._epochs:
            self._thread = threading.Thread(target=self._fill, name="dinor1-epoch-batches",
                                            daemon=True)
            self._thread.start()

    def extend(self, epoch: int) -> None:
        """One more batch may be pulled from ``epoch`` (the consumer skipped one). A batch
        skipped within ``lookahead`` of the limit comes too late for the thread, which has
        moved on: that epoch then ends one counted step short."""
        self._extra[epoch] = self._extra.get(epoch, 0) + 1

    def _may_pull(self, epoch: int, pulled: int) -> bool:
        if epoch in self._left or self._stop.is_set():
            return False
        return self._limit is None or pulled < self._limit + self._extra.get(epoch, 0)

    def _pull(self, epoch: int) -> Iterator[Any]:
        iterator = iter(self._make(epoch))
        pulled = 0
        try:
            while self._may_pull(epoch, pulled):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                pulled += 1
                yield batch
        finally:  # ends this epoch's split at Ray's coordinator before the next one starts
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for epoch in self._epochs:
                for batch in self._pull(epoch):
                    if not self._put((epoch, batch)):
                        return
                if not self._put((epoch, _END)):
                    return
        except BaseException as exc:  # re-raised on the consumer's thread
            self._put((None, exc))

    def _get(self):
        """The next queue item; None once the thread has stopped and left nothing."""
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        return None

    def batches(self, epoch: int) -> Iterator[Any]:
        """This epoch's batches. Epochs must be consumed in order; leaving one early (a break,
        or closing this generator) drops the rest of it, so the next one starts clean."""
        if self._thread is None:
            yield from self._pull(epoch)
            return
        finished = False
        try:
            while True:
                if self._error is not None:
                    raise self._error
                entry = self._get()
                if entry is None:
                    raise RuntimeError(f"epoch {epoch}: the batch thread stopped (closed)")
                got, item = entry
                if got is None:
                    raise item
                if got != epoch:
                    raise RuntimeError(f"epoch {epoch} asked for, epoch {got} in the queue")
                if item is _END:
                    finished = True
                    return
                yield item
        finally:
            if not finished:
                self._drain(epoch)

    def _drain(self, epoch: int) -> None:
        self._left.add(epoch)
        while not self._stop.is_set():
            entry = self._get()
            if entry is None:
                return
            got, item = entry
            if got is None:  # for the next batches() call: not raised inside a finally
                self._error = item
                return
            if got == epoch and item is _END:
                return

    def close(self, timeout: float = 30.0) -> None:
        """Stops the background thread and, with it, the epoch it was pulling from. (A thread
        blocked inside Ray, e.g. at the next epoch's barrier waiting for a lost worker, is left
        to end with the process: it is a daemon.)"""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
