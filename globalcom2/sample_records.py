"""Per-sample records of an evaluation: what the model saw, what it answered, what it cost.

One :class:`SampleRecord` is kept for every answered request (padding requests that lmms-eval adds to
even out data-parallel ranks are not recorded). The plugin (``globalcom2.lmms.plugin``) keeps them on the
model instance (``lm.records``), can gather them from all ranks (``lm.gather_records()``) and writes them
to a JSONL sidecar (:func:`write_jsonl`, atomic) beside the cell's ``record.json``
(``globalcom2.records``). :func:`summarize` counts them; ``globalcom2.efficiency.summary`` turns their
timings and token counts into the cell's efficiency block.

Visual-token fields (see :func:`visual_token_counts`):

* ``visual_tokens_before``: visual tokens the vision side produced, i.e. what the unmodified model feeds
  its LLM (thumbnail + unpadded crops + row separators).
* ``visual_tokens_llm_input``: visual tokens in the prompt that enters the first decoder layer (smaller
  than ``before`` only for pre-LLM methods).
* ``visual_tokens_after``: the visual tokens the LLM processes, averaged over its layers (the
  "equivalent" count papers compare). For pre-LLM methods it equals ``llm_input``; in-LLM methods report
  it in their per-row stats.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_text
from globalcom2.methods.base import ImageStats, LayerStats, Stats

#: The ``kind`` tag of each stats type in ``sample_records.jsonl`` (typed in memory, tagged on disk).
STAT_KINDS: dict[str, type[ImageStats] | type[LayerStats]] = {"image": ImageStats, "layer": LayerStats}


#: A cell's per-sample records, one JSON object per line, next to its ``record.json``.
RECORDS_FILE = "sample_records.jsonl"


@dataclass
class SampleRecord:
    """One answered request.

    Latencies are those of the ``generate`` call that produced the answer; with ``batch_size > 1`` that
    call served the whole batch (``batch_size`` rows), so divide by it for an amortised per-sample cost.
    A process's first measured call (``first_call``) carries one-off costs (kernel selection, allocator
    growth, compilation under ``compile=true``), so the statistics leave it out and report it apart; so does
    any later call in which ``torch.compile`` compiled (``compiled_in_call``: a shape or guard the warm-up did
    not meet), whose time is mostly compilation.
    """

    task: str
    split: str
    doc_id: int
    rank: int
    batch_id: int
    batch_size: int
    method: str
    method_params: dict[str, Any]
    attn_implementation: Any
    num_images: int
    image_sizes: list[list[int]]  # (height, width) per image
    prompt_tokens: int  # the processor's prompt for this row (no padding), before compression
    llm_prompt_tokens: int  # the prompt the first decoder layer sees
    visual_tokens_before: int
    visual_tokens_llm_input: int
    visual_tokens_after: float
    output_tokens: int
    output_token_ids: list[int]
    answer: str
    empty_answer: bool
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens"
    preprocess_s: float
    prefill_s: float | None
    total_s: float | None
    peak_memory_bytes: int | None
    peak_memory_note: str | None
    clock: str | None
    compression: list[Stats] = field(default_factory=list)
    peak_memory_reserved_bytes: int | None = None
    stages_s: dict[str, float] | None = None  # exclusive seconds per stage (globalcom2.stage_timing)
    first_call: bool = False  # the process's first measured generate call: reported apart, not in statistics
    text_tokens: int | None = None  # prompt tokens that are not image placeholders (no padding)
    # Host stages of the batch (seconds; globalcom2/lmms/batch_pipeline.py). load_s and preprocess_s run in the
    # background thread when prefetching, so they may overlap the previous batch's generate; wait_s is how long
    # the generating thread waited for this batch, postprocess_s its answer decoding and records, and loop_s
    # its whole turn of the loop (wait, transfer, generate, postprocess): the sum of loop_s is wall time, less
    # the untimed warm-up calls made before a batch's generate.
    load_s: float | None = None
    wait_s: float | None = None
    postprocess_s: float | None = None
    loop_s: float | None = None
    compiled_in_call: bool = False  # torch.compile compiled during this measured call: not in statistics
    # What lmms-eval scored (the protocol's reading of ``answer``; protocol.rules.TaskProtocol.read_answer),
    # and whether that reading found nothing to read and fell back to a default (POPE's "yes", ScienceQA's
    # FAILED under protocol=llava). None/False in records from before they existed.
    scored_answer: str | None = None
    unread_answer: bool = False
    # The LLM's first forward with the method's work inside it (efficiency.profile.Measurement.llm_forward_s);
    # None in records from before it existed.
    llm_forward_s: float | None = None
    # Read back from the answers journal instead of generated (globalcom2/answer_journal.py), typically an
    # interrupted run's answer: its timings, rank and batch id are those of the call that generated it.
    replayed: bool = False

    @property
    def in_statistics(self) -> bool:
        """Whether this record's call counts in latency and throughput figures: not the first measured call,
        nor one that compiled (both are reported apart)."""
        return not self.first_call and not self.compiled_in_call

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "compression": [stat_to_dict(s) for s in self.compression]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleRecord:
        return cls(**{**data, "compression": [stat_from_dict(s) for s in data.get("compression", [])]})


def stat_to_dict(stat: Stats) -> dict[str, Any]:
    """``stat`` as a plain dict tagged with its ``kind``, with its derived counts added for readers of the
    JSONL (``tokens_after``; ``equivalent_visual_tokens``); :func:`stat_from_dict` reverses it."""
    if isinstance(stat, ImageStats):
        return {"kind": "image", **dataclasses.asdict(stat), "tokens_after": stat.tokens_after}
    if isinstance(stat, LayerStats):
        derived = {"equivalent_visual_tokens": stat.equivalent_visual_tokens}
        return {"kind": "layer", **dataclasses.asdict(stat), **derived}
    raise TypeError(f"compression stats must be ImageStats or LayerStats, got {type(stat).__name__}")


def stat_from_dict(data: dict[str, Any]) -> Stats:
    """The stats object :func:`stat_to_dict` wrote (derived keys are recomputed, not read)."""
    kind = data.get("kind")
    if kind not in STAT_KINDS:
        raise ValueError(
            f"compression stats of kind {kind!r}; valid: {', '.join(STAT_KINDS)}. Files written before the "
            "kind tag cannot be read back: re-run the cell"
        )
    cls = STAT_KINDS[kind]
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value  # JSON arrays were tuples
    return cls(**values)


def assign_stats(stats: Sequence[Any], images_per_row: Sequence[int]) -> list[list[Any]]:
    """Split the stats one ``generate`` call appended into one list per batch row.

    Pre-LLM methods append one stats object per image, in scatter (= batch) order; in-LLM methods append
    one per batch row, or, under beam search, one per beam of each row (identical: every beam prefills the
    row's prompt), which count once. Any other count is an error: silently misattributing token counts
    would corrupt every efficiency number downstream.
    """
    rows = len(images_per_row)
    if not stats:
        if sum(images_per_row) == 0:
            return [[] for _ in range(rows)]
        raise RuntimeError("the attached method recorded no stats for a batch with images")
    if all(isinstance(s, ImageStats) for s in stats):
        if len(stats) != sum(images_per_row):
            raise RuntimeError(
                f"expected one per-image stats entry per image ({sum(images_per_row)}), got {len(stats)}"
            )
        out, start = [], 0
        for count in images_per_row:
            out.append(list(stats[start : start + count]))
            start += count
        return out
    copies, remainder = divmod(len(stats), rows) if rows else (0, 1)
    if (
        remainder == 0
        and copies > 1
        and all(
            stats[row * copies + beam] == stats[row * copies] for row in range(rows) for beam in range(copies)
        )
    ):
        # beam search: generate prefills each row once per beam (consecutive copies), the same prompt each time
        return [[stats[row * copies]] for row in range(rows)]
    if len(stats) != rows:
        raise RuntimeError(f"expected one per-row stats entry per batch row ({rows}), got {len(stats)}")
    return [[s] for s in stats]


def visual_token_counts(row_stats: Sequence[Stats]) -> tuple[int, int, float]:
    """``(before, llm_input, after)`` visual tokens of one batch row (see the module docstring)."""
    if not row_stats:
        return 0, 0, 0.0
    if all(isinstance(s, ImageStats) for s in row_stats):
        before = sum(int(s.tokens_before) for s in row_stats)
        after = sum(int(s.tokens_after) for s in row_stats)
        return before, after, float(after)
    (stat,) = row_stats
    if not isinstance(stat, LayerStats):
        raise TypeError(f"per-row stats must be LayerStats, got {type(stat).__name__}")
    return stat.visual_tokens_before, stat.visual_tokens_per_layer[0], stat.equivalent_visual_tokens


def summarize(records: Sequence[SampleRecord]) -> dict[str, Any]:
    """Counts of a cell's records: samples, empty answers, answers the protocol could not read (per task),
    ``generate`` calls, mean token counts.

    Latency, throughput and memory are summarised once, in the efficiency block
    (:func:`globalcom2.efficiency.summary.latency_summary`), not here.
    """

    def mean(values: Iterable[float]) -> float | None:
        values = list(values)
        return statistics.fmean(values) if values else None

    unread = collections.Counter(r.task for r in records if r.unread_answer)
    return {
        "samples": len(records),
        "empty_answers": sum(r.empty_answer for r in records),
        "unread_answers": dict(sorted(unread.items())),  # per task, where the protocol fell back to a default
        "generate_calls": len({(r.rank, r.batch_id) for r in records}),
        "replayed": sum(r.replayed for r in records),  # answers read back from an interrupted run's journal
        "mean_visual_tokens_before": mean(r.visual_tokens_before for r in records),
        "mean_visual_tokens_llm_input": mean(r.visual_tokens_llm_input for r in records),
        "mean_visual_tokens_after": mean(r.visual_tokens_after for r in records),
        "mean_output_tokens": mean(r.output_tokens for r in records),
    }


def sort_key(record: SampleRecord) -> tuple[str, str, int]:
    return record.task, record.split, record.doc_id


def write_jsonl(path: str | os.PathLike[str], records: Sequence[SampleRecord]) -> Path:
    """Write ``records`` (sorted by task, split, doc id) to ``path`` atomically (temp file + rename)."""
    lines = (
        json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in sorted(records, key=sort_key)
    )
    return atomic_write_text(path, "".join(lines))


def read_jsonl(path: str | os.PathLike[str]) -> list[SampleRecord]:
    """Read records written by :func:`write_jsonl`.

    Raises:
        ValueError: a line that is not a sample record, named by the file and its line number.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(SampleRecord.from_dict(json.loads(line)))
            except (TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
                raise ValueError(
                    f"{path}:{number}: not a sample record ({type(err).__name__}: {err})"
                ) from err
    return records
