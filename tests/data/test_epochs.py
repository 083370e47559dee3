"""EpochBatches: the same batches per epoch as a plain loop, the next epoch started before the
consumer has finished the current one, caps honoured, errors and early exits handled; and the
same through a real Ray streaming split shared by two consumers."""

import threading
import time

import pytest

from dinor1.data.epochs import EpochBatches


class Recorder:
    """Epoch -> range of batches; records when each epoch's iterator starts and ends."""

    def __init__(self, per_epoch: int = 10, fail_at: tuple[int, int] | None = None):
        self.per_epoch, self.fail_at = per_epoch, fail_at
        self.events: list[tuple[str, int]] = []
        self.pulled: dict[int, int] = {}

    def __call__(self, epoch: int):
        self.events.append(("start", epoch))
        try:
            for i in range(self.per_epoch):
                if self.fail_at == (epoch, i):
                    raise ValueError(f"bad block in epoch {epoch}")
                self.pulled[epoch] = self.pulled.get(epoch, 0) + 1
                yield (epoch, i)
        finally:
            self.events.append(("end", epoch))


@pytest.mark.parametrize("lookahead", [0, 1, 4])
def test_same_batches_as_a_plain_loop(lookahead):
    source = Recorder(per_epoch=7)
    epochs = EpochBatches(source, range(3), lookahead=lookahead)
    got = {e: list(epochs.batches(e)) for e in range(3)}
    epochs.close()
    assert got == {e: [(e, i) for i in range(7)] for e in range(3)}
    # one iterator per epoch, in order, each ended before the next one started
    assert source.events == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                             ("start", 2), ("end", 2)]


def test_next_epoch_starts_while_the_consumer_trains_on_the_buffer():
    source = Recorder(per_epoch=10)
    epochs = EpochBatches(source, range(2), lookahead=4)
    consumed = []
    seen_start_of_1_at = None
    for batch in epochs.batches(0):
        time.sleep(0.02)  # a training step
        consumed.append(batch)
        if seen_start_of_1_at is None and ("start", 1) in source.events:
            seen_start_of_1_at = len(consumed)
    list(epochs.batches(1))
    epochs.close()
    assert len(consumed) == 10
    # epoch 1's iterator started with batches of epoch 0 still buffered for the consumer
    assert seen_start_of_1_at is not None and seen_start_of_1_at <= 10 - 3


def test_without_lookahead_nothing_runs_ahead():
    source = Recorder(per_epoch=5)
    epochs = EpochBatches(source, range(2), lookahead=0)
    for _ in epochs.batches(0):
        assert ("start", 1) not in source.events
    epochs.close()


def test_limit_caps_each_epoch_and_extend_raises_it():
    source = Recorder(per_epoch=10)
    epochs = EpochBatches(source, range(2), lookahead=2, limit=4)
    first = []
    for batch in epochs.batches(0):
        if batch == (0, 0):  # the consumer skipped this one early: it may pull one more
            epochs.extend(0)
        first.append(batch)
    second = list(epochs.batches(1))
    epochs.close()
    assert first == [(0, i) for i in range(5)]
    assert second == [(1, i) for i in range(4)]
    assert source.pulled == {0: 5, 1: 4}  # never pulled past the cap (Ray reads no more)


def test_leaving_an_epoch_early_drops_its_rest():
    source = Recorder(per_epoch=50)
    epochs = EpochBatches(source, range(2), lookahead=3)
    batches = epochs.batches(0)
    for batch in batches:
        if batch == (0, 5):
            break
    batches.close()
    assert list(epochs.batches(1)) == [(1, i) for i in range(50)]
    epochs.close()
    assert source.pulled[0] < 50  # the thread stopped pulling the epoch that was left


def test_an_error_in_the_data_reaches_the_consumer():
    source = Recorder(per_epoch=10, fail_at=(1, 3))
    epochs = EpochBatches(source, range(3), lookahead=2)
    assert len(list(epochs.batches(0))) == 10
    with pytest.raises(ValueError, match="bad block in epoch 1"):
        list(epochs.batches(1))
    epochs.close()


def test_close_stops_the_thread_mid_epoch():
    source = Recorder(per_epoch=10**6)
    epochs = EpochBatches(source, range(2), lookahead=2)
    next(iter(epochs.batches(0)))
    epochs.close(timeout=10)
    assert not epochs._thread.is_alive()
    assert ("end", 0) in source.events  # the epoch's iterator was closed, not abandoned


@pytest.mark.ray
def test_two_consumers_of_a_ray_streaming_split(ray_cluster):
    """Both halves of a streaming split, each through its own EpochBatches (as two training
    workers): every epoch delivers every row exactly once, capped epochs and all."""
    ray = ray_cluster
    ds = ray.data.range(400, override_num_blocks=8)
    splits = ds.streaming_split(2, equal=True)

    def make(split):
        return lambda epoch: split.iter_batches(batch_size=10, batch_format="numpy")

    results: list[dict] = [{}, {}]
    errors = []
    before = set(threading.enumerate())

    def consume(i, cap):
        try:
            epochs = EpochBatches(make(splits[i]), range(3), lookahead=3, limit=cap)
            for e in range(3):
                results[i][e] = [int(x) for b in epochs.batches(e) for x in b["id"]]
            epochs.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for cap in (None, 5):
        threads = [threading.Thread(target=consume, args=(i, cap)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and not any(t.is_alive() for t in threads)
        for e in range(3):
            rows = results[0][e] + results[1][e]
            assert len(rows) == len(set(rows))
            if cap is None:
                assert sorted(rows) == list(range(400))
            else:
                assert len(results[0][e]) == len(results[1][e]) == 5 * 10

    # Ray Data's fetch threads of a capped epoch stay blocked on the split coordinator for blocks
    # nobody takes: a training worker's end ends them. This process lives on (and would call
    # ray.shutdown() under them at the session's end, which kills it), so end the coordinator as
    # the run's end would; its threads then see the actor gone and stop.
    ray.kill(splits[0]._coord_actor)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _fetch_threads(before):
        time.sleep(0.1)
    assert not _fetch_threads(before)


def _fetch_threads(before: set) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name == "iter_threaded"]
