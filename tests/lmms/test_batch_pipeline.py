"""Batches grouped by length and prepared in background threads: every request once, in lmms-eval's order at
the end, errors raised where they belong, preparation overlapping generation, and several encoding threads
working side by side without changing a batch or its order."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from globalcom2.answer_journal import JournaledBatch, Replay, window_digest
from globalcom2.lmms.batch_pipeline import (
    ENCODER_THREADS,
    FEEDER_THREAD,
    BatchFeeder,
    length_order,
    plan_batches,
)
from globalcom2.protocol.batching import PreparedBatch


def prepared_for(sizes: list[tuple[int, int] | None], prompts: list[str] | None = None) -> PreparedBatch:
    """One row per entry: an image of that (width, height), or none."""
    images = [Image.new("RGB", size) for size in sizes if size is not None]
    return PreparedBatch(
        prompts=prompts or [f"q{i}" for i in range(len(sizes))],
        images=images,
        images_per_row=[0 if size is None else 1 for size in sizes],
        keys=[("toy", "test", i) for i in range(len(sizes))],
    )


def area(image: Image.Image) -> int:
    return image.width * image.height


def test_rows_are_ordered_by_visual_tokens_then_prompt_length():
    prepared = prepared_for([(30, 30), (10, 10), None, (10, 10)], prompts=["a", "long prompt", "b", "c"])
    assert length_order(prepared, area) == [2, 3, 1, 0]


def test_select_keeps_each_rows_own_images():
    prepared = prepared_for([(30, 30), None, (10, 20)])
    picked = prepared.select([2, 1, 0])
    assert [image.size for image in picked.images] == [(10, 20), (30, 30)]
    assert picked.images_per_row == [1, 0, 1] and [k[2] for k in picked.keys] == [2, 1, 0]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_batches_cover_every_row_once(batch_size):
    prepared = prepared_for([(20, 20), (10, 10), (30, 30), (10, 10), (20, 20)])
    batches = plan_batches(prepared, batch_size, area)
    assert sorted(row for batch in batches for row in batch) == list(range(5))
    assert all(len(batch) <= batch_size for batch in batches)
    if batch_size == 1:
        assert batches == [[0], [1], [2], [3], [4]]  # nothing reordered at batch size 1
    if batch_size == 2:
        assert batches == [[1, 3], [0, 4], [2]]  # equal lengths share a batch: no padding in the first two


def feeder_for(sizes, batch_size, lookahead, window=8, load=None, encode=None, replay=None, threads=1):
    prepared = prepared_for(sizes)

    def default_load(positions):
        return prepared.select(list(positions))

    return BatchFeeder(
        load or default_load,
        encode or (lambda batch: [k[2] for k in batch.keys]),
        area,
        batch_size,
        window=window,
        lookahead=lookahead,
        threads=threads,
        replay=replay,
    )


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith((FEEDER_THREAD, ENCODER_THREADS))]


@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("window", [1, 2, 8])
def test_every_position_is_fed_once_with_its_own_inputs(lookahead, window):
    sizes = [(20, 20), (10, 10), (30, 30), (10, 10), (20, 20), (40, 10), None]
    positions = [6, 0, 2, 5, 1, 3, 4]  # any subset order, as a settings group gives it
    feeder = feeder_for(sizes, batch_size=2, lookahead=lookahead, window=window)
    seen = []
    for ready, waited in feeder.batches(positions):
        assert ready.inputs == [key[2] for key in ready.prepared.keys] == ready.indices  # rows stay aligned
        assert waited >= 0 and ready.load_s >= 0 and ready.preprocess_s >= 0
        seen += ready.indices
    assert sorted(seen) == sorted(positions)


def test_the_same_batches_with_and_without_the_background_thread():
    sizes = [(20, 20), (10, 10), (30, 30), (10, 10), (20, 20), (40, 10), None, (30, 30)]
    runs = [
        [ready.indices for ready, _ in feeder_for(sizes, 3, lookahead).batches(range(len(sizes)))]
        for lookahead in (0, 1, 3)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_more_encoding_threads_give_the_same_batches_in_the_same_order():
    """Later batches may finish encoding first (here the even ones are slower): the consumer still gets the
    planned order, each batch with its own rows' inputs."""
    sizes = [(20, 20), (10, 10), (30, 30), (10, 10), (20, 20), (40, 10), None, (30, 30)] * 2

    def encode(batch):
        first = batch.keys[0][2]
        time.sleep(0.02 if first % 2 == 0 else 0.0)
        return [k[2] for k in batch.keys]

    def run(lookahead: int, threads: int) -> list[tuple[list[int], list[int]]]:
        feeder = feeder_for(sizes, 3, lookahead, window=2, encode=encode, threads=threads)
        return [(ready.indices, ready.inputs) for ready, _ in feeder.batches(range(len(sizes)))]

    serial = run(0, 1)
    assert all(indices == inputs for indices, inputs in serial)
    assert run(2, 1) == run(2, 4) == run(1, 3) == serial


def test_several_encoding_threads_encode_side_by_side():
    """No clock: each encode waits at a barrier of three, which only three threads encoding at once can pass;
    one thread cannot (the barrier breaks, and the error reaches the consumer)."""

    def run(threads: int) -> set[str]:
        barrier = threading.Barrier(3, timeout=0.5 if threads == 1 else 30)
        names = set()

        def encode(batch):
            names.add(threading.current_thread().name)
            barrier.wait()
            return None

        feeder = feeder_for([(10, 10)] * 6, 1, lookahead=3, window=6, encode=encode, threads=threads)
        for _ in feeder.batches(range(6)):
            pass
        return names

    names = run(threads=3)
    assert len(names) == 3 and all(name.startswith(ENCODER_THREADS) for name in names)
    with pytest.raises(threading.BrokenBarrierError):
        run(threads=1)
    assert pipeline_threads() == []  # the error closed the feeder and its pool


@pytest.mark.parametrize("lookahead, threads", [(0, 1), (2, 1), (2, 3)])
def test_a_preparation_error_reaches_the_consumer_with_its_type_and_message(lookahead, threads):
    def load(positions):
        if 3 in positions:
            raise ValueError("toy doc 3: expected PIL images, got str")
        return prepared_for([(10, 10)] * len(positions))

    feeder = feeder_for([(10, 10)] * 6, 1, lookahead=lookahead, window=1, load=load, threads=threads)
    fed = []
    with pytest.raises(ValueError, match="toy doc 3: expected PIL images"):
        for ready, _ in feeder.batches(range(6)):
            fed += ready.indices
    assert fed == [0, 1, 2]  # every batch before the bad one was served
    assert pipeline_threads() == []


@pytest.mark.parametrize("lookahead, threads", [(0, 1), (2, 1), (2, 3)])
def test_an_encoding_error_reaches_the_consumer_at_its_batch(lookahead, threads):
    def encode(batch):
        if batch.keys[0][2] == 3:
            raise ValueError("toy doc 3: the processor refused the image")
        return [k[2] for k in batch.keys]

    feeder = feeder_for([(10, 10)] * 8, batch_size=1, lookahead=lookahead, encode=encode, threads=threads)
    fed = []
    with pytest.raises(ValueError, match="toy doc 3: the processor refused the image"):
        for ready, _ in feeder.batches(range(8)):
            fed += ready.inputs
    assert fed == [0, 1, 2]  # in order up to the bad batch, even where later ones were encoded first
    assert pipeline_threads() == []


@pytest.mark.parametrize("threads", [1, 3])
def test_an_error_in_the_consumers_loop_stops_the_threads(threads):
    feeder = feeder_for([(10, 10)] * 50, batch_size=1, lookahead=2, window=1, threads=threads)
    with pytest.raises(KeyError, match="the model failed"):
        for ready, _ in feeder.batches(range(50)):
            if ready.indices == [4]:
                raise KeyError("the model failed")
    assert feeder._thread is None and feeder._pool is None
    assert pipeline_threads() == []


def test_one_feeder_serves_one_run_at_a_time():
    feeder = feeder_for([(10, 10)] * 20, batch_size=1, lookahead=2, window=1, threads=2)
    first = feeder.batches(range(20))
    next(first)
    with pytest.raises(RuntimeError, match="already feeding a run"):
        next(feeder.batches(range(20)))
    assert [ready.indices for ready, _ in first] == [[i] for i in range(1, 20)]  # the first run is intact
    assert [ready.indices for ready, _ in feeder.batches(range(3))] == [[0], [1], [2]]  # and then free again


@pytest.mark.parametrize("threads", [1, 3])
def test_a_consumer_that_stops_early_stops_the_threads(threads):
    feeder = feeder_for([(10, 10)] * 50, batch_size=1, lookahead=2, window=1, threads=threads)
    batches = feeder.batches(range(50))
    next(batches)
    batches.close()  # what leaving a for loop early (or an exception in its body) does to the generator
    assert feeder._thread is None and feeder._pool is None
    assert pipeline_threads() == []


def test_the_next_batch_is_prepared_while_the_consumer_works_on_this_one():
    """No clock: while the consumer holds batch k, it waits for the feeder to start preparing batch k + 1.
    With the background thread that happens; without it (lookahead 0) it cannot, and the wait times out."""

    def run(lookahead: int) -> list[bool]:
        started = {k: threading.Event() for k in range(4)}

        def encode(batch):
            started[batch.keys[0][2]].set()
            return None

        feeder = feeder_for([(10, 10)] * 4, batch_size=1, lookahead=lookahead, window=4, encode=encode)
        overlapped = []
        for ready, _ in feeder.batches(range(4)):
            k = ready.indices[0]
            if k < 3:
                overlapped.append(started[k + 1].wait(timeout=0.5 if lookahead == 0 else 30))
        return overlapped

    assert run(lookahead=2) == [True, True, True]
    assert run(lookahead=0) == [False, False, False]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size, window and threads must be >= 1 and lookahead >= 0"):
        feeder_for([(10, 10)], batch_size=0, lookahead=2)
    with pytest.raises(ValueError, match=r"got 1, 8, 0, 2"):
        feeder_for([(10, 10)], batch_size=1, lookahead=2, threads=0)


def test_a_windows_loading_is_charged_to_the_batch_that_waits_for_it():
    def load(positions):
        time.sleep(0.001)
        return prepared_for([(10, 10)] * len(positions))

    feeder = feeder_for([(10, 10)] * 5, batch_size=1, lookahead=0, window=2, load=load)
    loads = [ready.load_s for ready, _ in feeder.batches(range(5))]
    assert [load > 0 for load in loads] == [True, False, True, False, True]


@pytest.mark.parametrize("lookahead", [0, 2])
def test_answered_batches_are_replayed_and_an_answered_window_is_not_even_read(lookahead):
    keys = [("toy", "test", i, 0, "digest") for i in range(8)]
    windows = {0: window_digest(keys[:4]), 1: window_digest(keys[4:])}  # windows of 2 batches of 2
    answered = [(0, 1), (2, 3), (4, 5)]  # the first window (positions 0-3) whole, the second's first batch
    batches = [
        JournaledBatch(tuple(keys[i] for i in b), windows[b[0] // 4], ({},) * len(b)) for b in answered
    ]
    journal = {batch.key: batch for batch in batches}
    loaded, encoded = [], []
    prepared = prepared_for([(10, 10)] * 8)

    def load(positions):
        loaded.append(list(positions))
        return prepared.select(list(positions))

    def encode(batch):
        encoded.append([k[2] for k in batch.keys])
        return None

    feeder = BatchFeeder(load, encode, area, 2, window=2, lookahead=lookahead, replay=Replay(journal, keys))
    fed = [(type(ready).__name__, ready.indices) for ready, _ in feeder.batches(range(8))]
    assert fed == [
        ("ReplayedBatch", [0, 1]),
        ("ReplayedBatch", [2, 3]),
        ("ReplayedBatch", [4, 5]),
        ("ReadyBatch", [6, 7]),
    ]
    assert loaded == [[4, 5, 6, 7]] and encoded == [[6, 7]]


@pytest.mark.parametrize("lookahead", [0, 2])
def test_a_window_read_while_a_replayed_batch_waited_is_charged_to_no_generated_batch(lookahead):
    """The consumer waits for the window's reading at its first batch; when that batch is replayed, its turn
    is no batch's loop time (``plugin.generate_until``), so no generated batch of the window may carry the
    reading either: a batch's stages must fit in its own turn."""
    keys = [("toy", "test", i, 0, "digest") for i in range(4)]
    journal = {(b := JournaledBatch((keys[0],), window_digest(keys[:2]), ({},))).key: b}

    def load(positions):
        time.sleep(0.001)
        return prepared_for([(10, 10)] * len(positions))

    feeder = feeder_for(
        [(10, 10)] * 4, batch_size=1, lookahead=lookahead, window=2, load=load, replay=Replay(journal, keys)
    )
    fed = [(type(ready).__name__, getattr(ready, "load_s", None)) for ready, _ in feeder.batches(range(4))]
    assert [name for name, _ in fed] == ["ReplayedBatch", "ReadyBatch", "ReadyBatch", "ReadyBatch"]
    # the second window's reading is waited for by its first batch, generated: charged there
    assert [load > 0 for _, load in fed[1:]] == [False, True, False]
