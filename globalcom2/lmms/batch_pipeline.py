"""The plugin's batches: grouped so that each pads little, and prepared in background threads while the model
generates the one before.

lmms-eval hands a simple model every request of a process in one ``generate_until`` call. Preparing a batch
(reading its documents and images, then running the processor) is host work; done between two ``generate``
calls it leaves the device idle. Here a background thread reads the documents and hands each batch to a pool
of ``threads`` encoding threads (the processor), up to ``lookahead`` batches ahead, so the host work of the
next batches overlaps the generation of batch ``k``. The batches still come out in their planned order, each
with inputs that depend on its own rows only, so the thread count changes when a batch is ready, never what
is in it. Several encoding threads matter when one cannot keep up with the device: the PIL image processor
of LLaVA-NeXT takes about 30 ms per 672x672 image on one core, so one thread supplies about 30 samples/s,
the rate the throughput targets ask of a GPU with a compressed 7B. The processor releases the GIL while it
resizes and normalises, so threads add up: through this feeder on a 2-core CPU, nothing generating, one
thread supplied 27.6 samples/s, two 40.2 and four 46.8 (``make bench-prefetch-threads``,
``results/throughput/prefetch_threads_cpu.md``).

Grouping: the requests of one generation setting are read ``window`` batches at a time. Inside a window they
are ordered by length: visual tokens (each image's AnyRes layout, known from its size), then the prompt's
characters. A batch then holds requests of similar length and left-pads little. lmms-eval's own models order
by the tokenised context alone (``_collate`` in lmms_eval/models/simple/llava_hf.py, 0.7.3), which misses the
images, the larger part of a LLaVA-NeXT prompt. The window bounds how many decoded images are held at once.
Answers go back to their request's position, so lmms-eval sees its own order; with ``batch_size = 1`` nothing
is reordered.

Resuming: with a :class:`~globalcom2.answer_journal.Replay`, a batch that an interrupted run of the same
evaluation already answered comes back as a :class:`ReplayedBatch` instead of being prepared; a window whose
every request was answered is not even read.

Why threads and not a process pool: the documents live in lmms-eval's ``task_dict`` (datasets objects and
task callables that do not pickle reliably), and the heavy parts of preparation (image decoding, resizing,
tensor conversion) release the GIL.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from globalcom2.protocol.batching import PreparedBatch

if TYPE_CHECKING:
    from globalcom2.answer_journal import JournaledBatch, Replay

#: Batches read (and ordered by length) together; bounds the decoded images held in memory.
DEFAULT_WINDOW = 8
#: Batches prepared ahead of the one generating (at least one per encoding thread, so that each has work).
DEFAULT_LOOKAHEAD = 2
#: Name of the thread that reads documents and plans batches, and prefix of the encoding threads' names.
FEEDER_THREAD = "globalcom2-batch-feeder"
ENCODER_THREADS = "globalcom2-batch-encoder"


@dataclass(frozen=True)
class ReadyBatch:
    """One batch, prepared on the host and ready to move to the device.

    Attributes:
        indices: the batch rows' positions in the request list ``generate_until`` received.
        prepared: prompts, images and keys of the rows.
        inputs: the processor's ``BatchFeature`` (CPU tensors).
        load_s: seconds spent reading documents and images for this batch: its whole window's for the first
            batch of a window (the one that waits for the reading), 0 for the others, and 0 for every batch of
            a window whose first batch was replayed from an answers journal (that one waited for it).
        preprocess_s: seconds spent in the processor for this batch (on its encoding thread: with several,
            batches encode side by side, so these seconds add up to more than the wall time they took).
        window: the positions of the window the batch was planned among (its rows depend on all of them).
    """

    indices: list[int]
    prepared: PreparedBatch
    inputs: Any
    load_s: float
    preprocess_s: float
    window: list[int]


@dataclass(frozen=True)
class ReplayedBatch:
    """One batch answered by an earlier run of the same evaluation, read back from its answers journal.

    Attributes:
        indices: the batch rows' positions in the request list ``generate_until`` received.
        journaled: the rows' keys and records, in the same order.
    """

    indices: list[int]
    journaled: JournaledBatch


def length_order(prepared: PreparedBatch, visual_tokens: Callable[[Any], int]) -> list[int]:
    """Rows of ``prepared`` from shortest to longest (stable): visual tokens of the row's images, then the
    prompt's length in characters."""
    keys = [
        (sum(visual_tokens(image) for image in prepared.row_images(row)), len(prompt))
        for row, prompt in enumerate(prepared.prompts)
    ]
    return sorted(range(len(keys)), key=keys.__getitem__)


def plan_batches(
    prepared: PreparedBatch, batch_size: int, visual_tokens: Callable[[Any], int]
) -> list[list[int]]:
    """The rows of one window split into batches of ``batch_size``: in order when ``batch_size`` is 1, else
    grouped by length (:func:`length_order`)."""
    order = list(range(len(prepared.prompts))) if batch_size == 1 else length_order(prepared, visual_tokens)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


_DONE = object()


@dataclass(frozen=True)
class _Encoding:
    """A planned batch whose processor inputs are being computed (or are): ``inputs`` resolves to the inputs
    and the seconds the processor took."""

    indices: list[int]
    prepared: PreparedBatch
    window: list[int]
    load_s: float
    inputs: Future


class BatchFeeder:
    """Yields :class:`ReadyBatch` es for a list of request positions, prepared ahead in background threads.

    Args:
        load: request positions -> :class:`PreparedBatch` (documents, prompts, images).
        encode: :class:`PreparedBatch` -> the processor's inputs (CPU). With ``threads > 1`` it is called from
            several threads at once, so it must not share unsafe state between them (the plugin gives each
            thread its own processor).
        visual_tokens: a PIL image -> its visual-token count (for grouping by length).
        batch_size: rows per batch.
        window: batches read and ordered together.
        lookahead: batches prepared ahead; 0 prepares each batch in the consumer's thread, in turn (no
            overlap), which the throughput benchmark uses as its baseline.
        threads: encoding threads when ``lookahead > 0``; up to ``max(lookahead, threads) + 1`` batches are
            prepared or being prepared ahead of the consumer's (each thread has one to encode), which with
            the window's images bounds the host memory the pipeline holds.
        replay: batches answered before (an interrupted run's answers journal), yielded as
            :class:`ReplayedBatch` es in their place; ``None`` prepares every batch.

    An error while preparing is raised in the consumer, at the batch it concerns, with its own type and
    message; the threads stop when the consumer stops early (leaving the loop over :meth:`batches`, by
    ``break`` or an exception, closes the generator, which calls :meth:`close`).
    """

    def __init__(
        self,
        load: Callable[[Sequence[int]], PreparedBatch],
        encode: Callable[[PreparedBatch], Any],
        visual_tokens: Callable[[Any], int],
        batch_size: int,
        *,
        window: int = DEFAULT_WINDOW,
        lookahead: int = DEFAULT_LOOKAHEAD,
        threads: int = 1,
        replay: Replay | None = None,
    ) -> None:
        if batch_size < 1 or window < 1 or lookahead < 0 or threads < 1:
            raise ValueError(
                "batch_size, window and threads must be >= 1 and lookahead >= 0, got "
                f"{batch_size}, {window}, {threads}, {lookahead}"
            )
        self._load, self._encode, self._visual_tokens = load, encode, visual_tokens
        self.batch_size, self.window, self.lookahead, self.threads = batch_size, window, lookahead, threads
        self._replay = replay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- producing --------------------------------------------------------------------------------------
    def _timed_encode(self, batch: PreparedBatch) -> tuple[Any, float]:
        began = time.perf_counter()
        inputs = self._encode(batch)
        return inputs, time.perf_counter() - began

    def _encode_here(self, batch: PreparedBatch) -> Future:
        """Encode in the calling thread; the future holds the result or the error, as a pool's would."""
        done: Future = Future()
        try:
            done.set_result(self._timed_encode(batch))
        except BaseException as err:  # raised by the consumer, at this batch, like a pool thread's error
            done.set_exception(err)
        return done

    def _produce(
        self, positions: Sequence[int], submit: Callable[[PreparedBatch], Future]
    ) -> Iterator[_Encoding | ReplayedBatch]:
        span = self.batch_size * self.window
        for start in range(0, len(positions), span):
            window = list(positions[start : start + span])
            answered = self._replay.window(window) if self._replay is not None else None
            if answered is not None:  # the whole window was answered: nothing to read
                yield from (ReplayedBatch(indices, journaled) for indices, journaled in answered)
                continue
            began = time.perf_counter()
            prepared = self._load(window)
            loaded = time.perf_counter() - began
            first = True
            for rows in plan_batches(prepared, self.batch_size, self._visual_tokens):
                indices = [window[row] for row in rows]
                journaled = self._replay.batch(indices, window) if self._replay is not None else None
                if journaled is not None:
                    yield ReplayedBatch(indices, journaled)
                    # the reading was waited for here, and a replayed batch's turn is no batch's loop time
                    # (plugin.generate_until): the generated batches after it did not wait for it
                    first = False
                    continue
                batch = prepared.select(rows)
                load_s = loaded if first else 0.0  # charged where it was waited for
                first = False
                yield _Encoding(indices, batch, window, load_s, submit(batch))

    def _fill(self, positions: Sequence[int], out: queue.Queue, pool: ThreadPoolExecutor) -> None:
        try:
            for item in self._produce(positions, lambda batch: pool.submit(self._timed_encode, batch)):
                if not self._put(out, item):
                    return
            self._put(out, _DONE)
        except BaseException as err:  # handed to the consumer, which raises it
            self._put(out, err)

    def _put(self, out: queue.Queue, item: object) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- consuming --------------------------------------------------------------------------------------
    def batches(self, positions: Sequence[int]) -> Iterator[tuple[ReadyBatch | ReplayedBatch, float]]:
        """``(batch, wait_s)`` for every batch of ``positions``, in the planned order; ``wait_s`` is how long the
        consumer waited for it (0 when the threads kept ahead; the whole preparation when ``lookahead`` is
        0)."""
        if self.lookahead == 0:
            produced = self._produce(positions, self._encode_here)
            while True:
                began = time.perf_counter()
                item = next(produced, None)
                if item is None:
                    return
                ready = _ready(item)
                yield ready, time.perf_counter() - began
        if self._thread is not None:  # its stop flag and pool are this instance's: one run at a time
            raise RuntimeError("this BatchFeeder is already feeding a run; close it or make another feeder")
        out: queue.Queue = queue.Queue(maxsize=max(self.lookahead, self.threads))
        self._stop.clear()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=ENCODER_THREADS)
        self._thread = threading.Thread(
            target=self._fill, args=(positions, out, self._pool), name=FEEDER_THREAD, daemon=True
        )
        self._thread.start()
        try:
            while True:
                began = time.perf_counter()
                item = self._get(out)
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                ready = _ready(item)  # type: ignore[arg-type]
                yield ready, time.perf_counter() - began
        finally:
            self.close()

    def _get(self, out: queue.Queue) -> object:
        while True:
            try:
                return out.get(timeout=0.1)
            except queue.Empty:
                alive = self._thread is not None and self._thread.is_alive()
                if (self._stop.is_set() or not alive) and out.empty():
                    raise RuntimeError("the batch feeder stopped before its last batch") from None

    def close(self) -> None:
        """Stop the background threads (idempotent): the feeder first, so that nothing more is submitted, then
        the encoding pool, whose queued batches are dropped and whose running ones are waited for."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ready(item: _Encoding | ReplayedBatch) -> ReadyBatch | ReplayedBatch:
    """The batch with its inputs, waiting for them if they are still being encoded (an encoding error is
    raised here, with its own type and message)."""
    if isinstance(item, ReplayedBatch):
        return item
    inputs, encoded_s = item.inputs.result()
    return ReadyBatch(item.indices, item.prepared, inputs, item.load_s, encoded_s, item.window)
