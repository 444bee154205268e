"""How many samples per second the plugin's batch preparation can supply with 1, 2, 4 ... encoding threads:
``make bench-prefetch-threads``.

While prefetching, the plugin reads each window of documents in one background thread and runs the processor
(LLaVA-NeXT's PIL image processor and the tokenizer) on a pool of ``prefetch_threads`` threads
(``globalcom2/lmms/batch_pipeline.py``). A GPU that generates faster than that pool prepares waits for it, so
this pool's rate bounds a cell's samples/s however fast the model is. This benchmark measures that bound
alone: the plugin's own feeder (its loading, its per-thread processor copies and, on CUDA, its pinned host
tensors) drained by a consumer that does nothing with the batches, nothing generating beside it. Each thread
count is timed ``--rounds`` times, the counts interleaved so that a machine's drift spreads over all of them.

What it does not measure: the decoding of images from a dataset's files (the images here are drawn in memory
first, as the demo generator draws them, so reading is cheap), and the contention with a model that runs on
the same cores (a CPU cell's threads compete with the model's, so there the figure is an upper bound), or
with the main thread of a GPU cell, which holds the GIL while it launches kernels.

    python -m globalcom2.lmms.prefetch_threads                         # efficiency split, batch 1, 1 2 4 threads
    python -m globalcom2.lmms.prefetch_threads --device cuda --threads 1 2 4 8

Writes ``results/throughput/prefetch_threads_<device>.{md,json}``: per thread count, samples/s (median and
range over the rounds), the speed-up over one thread, and the processor's mean seconds per batch on its
thread (which grows when threads contend); the JSON carries every round, the settings and provenance.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance

from globalcom2.data.demo import DEFAULT_SIZE, generate_items, render
from globalcom2.lmms.plugin import GlobalCom2LlavaNext
from globalcom2.paths import PROJECT_ROOT
from globalcom2.perf.variant_table import write_rows_table
from globalcom2.provenance import hardware_label, provenance

#: The task name the benchmark's requests carry (the plugin's lmms_eval protocol: the context is the question).
TASK = "prefetch_bench"
#: Models whose processor is LLaVA-v1.6's own (the AnyRes grid, the 336 crops, the PIL backend) at a load
#: cost of seconds: the processor, not the model, is what is timed.
MODELS = ("tiny-trained", "tiny")


def requests_for(split: str, samples: int) -> tuple[list[Instance], dict[str, Any]]:
    """``samples`` simple-model requests over the demo generator's ``split`` (its items repeated if there are
    fewer), and the ``task_dict`` the plugin reads their documents from."""
    items = generate_items(split)
    docs = [
        {"image": render(items[i % len(items)]), "question": items[i % len(items)].question}
        for i in range(samples)
    ]
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], {"max_new_tokens": 1}, lambda d: [d["image"]], i, TASK, split),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1, "split": split},
        )
        for i, doc in enumerate(docs)
    ]
    return requests, {TASK: {split: docs}}


def drain(lm: Any, requests: list[Instance]) -> tuple[float, list[float]]:
    """Seconds to have every batch of ``requests`` prepared and handed over, and each batch's processor
    seconds. The feeder (and its processor copies) is made before the clock starts, as the plugin makes it
    before its loop's."""
    feeder = lm._feeder(requests)
    began = time.perf_counter()
    encoded = [ready.preprocess_s for ready, _ in feeder.batches(range(len(requests)))]
    return time.perf_counter() - began, encoded


def output_stem(args: argparse.Namespace) -> Path:
    """The table's path without suffix: one per device type."""
    return args.out / f"prefetch_threads_{args.device.split(':')[0]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", choices=MODELS, default="tiny-trained")
    parser.add_argument(
        "--split", default="efficiency", choices=sorted(DEFAULT_SIZE), help="demo generator split"
    )
    parser.add_argument(
        "--samples", type=int, default=120, help="requests per round (the split's items repeated)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="rows per batch (1: the llava protocol's)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4], help="prefetch_threads to time")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per thread count, interleaved")
    parser.add_argument("--device", default="cpu", help="where the model sits: cuda pins the host tensors")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "throughput")
    args = parser.parse_args(argv)
    for name in ("samples", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.threads) < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = provenance(args.device)
    requests, task_dict = requests_for(args.split, args.samples)
    models = {}
    for threads in args.threads:
        lm = GlobalCom2LlavaNext(
            pretrained=args.pretrained, device=args.device, batch_size=args.batch_size, prefetch="true",
            prefetch_threads=threads, profile=False,
        )  # fmt: skip
        lm.task_dict = task_dict
        drain(lm, requests[: max(args.batch_size, threads)])  # untimed: first calls, lazy imports
        models[threads] = lm
    rounds: dict[int, list[dict[str, float]]] = {threads: [] for threads in args.threads}
    for _ in range(args.rounds):
        for threads, lm in models.items():
            wall, encoded = drain(lm, requests)
            rounds[threads].append({"wall_s": wall, "encode_s_per_batch": statistics.fmean(encoded)})
    one = statistics.median(args.samples / r["wall_s"] for r in rounds[min(args.threads)])
    rows = []
    for threads, timed in rounds.items():
        rates = [args.samples / r["wall_s"] for r in timed]
        rows.append(
            {
                "threads": threads,
                "samples/s": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                f"speed-up vs {min(args.threads)}": statistics.median(rates) / one,
                "processor ms per batch": 1e3 * statistics.median(r["encode_s_per_batch"] for r in timed),
            }
        )
    hardware = hardware_label(info["hardware"], args.device)
    caption = (
        f"Batch preparation alone, {args.samples} samples of the demo generator's {args.split} split per round "
        f"at batch {args.batch_size}, {args.pretrained}'s processor, model on {args.device} ({hardware}); "
        f"median of {args.rounds} rounds, nothing generating beside it: the most a cell's loop can be fed"
    )
    per_round = {str(threads): timed for threads, timed in rounds.items()}
    return write_rows_table(output_stem(args), caption, rows, args, info, rounds=per_round)


if __name__ == "__main__":
    main()
