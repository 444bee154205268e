"""``python -m globalcom2.lmms.show_inputs``: see exactly what the model is fed, sample by sample.

::

    python -m globalcom2.lmms.show_inputs --tasks pope_adv_local,mme_local --limit 2 --protocol llava

One JSON line per sample: ``task``, ``doc_id``, ``prompt`` (the full text passed to the tokenizer,
conversation template included), ``input_ids``, ``image_sizes`` (``[height, width]`` per image),
``grid`` (``[rows, cols]`` of crops per image), ``visual_tokens`` (per image, before compression) and
``gen_kwargs`` (what ``model.generate`` receives, plus ``until``). It builds them through the plugin's own
functions (``batching.prepare_batch``, ``protocols``) and the checkpoint's processor, without loading
any weight or generating, offline on the fixtures or on downloaded data. It is how a protocol is
checked, and how the tests pin one down.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from globalcom2.protocol.rules import DEFAULT_PROTOCOL, PROTOCOLS, geometry_of, task_protocol
from globalcom2.protocol.tokenization import encode_batch


def _leaf_tasks(task_dict: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, Task)`` of every task in lmms-eval's (possibly nested, for groups) task dict."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield (value.config.task if hasattr(value, "config") else str(key)), value


def show_inputs(
    tasks: list[str],
    limit: int,
    protocol: str = DEFAULT_PROTOCOL,
    pretrained: str = "tiny",
    generation_overrides: dict[str, Any] | None = None,
    default_max_new_tokens: int = 1024,
) -> Iterator[dict[str, Any]]:
    """The inputs of the first ``limit`` documents of each task, as the plugin would build them."""
    from lmms_eval.tasks import get_task_dict
    from transformers import AutoProcessor

    from globalcom2.anyres import config_layout
    from globalcom2.lmms.api import task_manager
    from globalcom2.lmms.preflight import check_tasks
    from globalcom2.models.geometry import apply_config_geometry, apply_processor_geometry
    from globalcom2.models.loader import resolve_checkpoint
    from globalcom2.models.preload import checkpoint_config
    from globalcom2.protocol.batching import prepare_batch

    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    for task in tasks:
        task_protocol(protocol, task)  # a task the protocol does not cover fails before anything loads
    checks = check_tasks(tasks)
    config = apply_config_geometry(checkpoint_config(pretrained), geometry_of(protocol))
    processor = AutoProcessor.from_pretrained(resolve_checkpoint(pretrained), backend="pil")
    apply_processor_geometry(processor, config)
    manager = task_manager(include_defaults=any(c.origin == "lmms-eval" for c in checks))
    for name, task in _leaf_tasks(get_task_dict(tasks, manager)):
        docs = task.test_docs()
        split = task.config.test_split
        rules = task_protocol(protocol, name)
        for doc_id in range(min(limit, len(docs))):
            doc = docs[doc_id]
            request = SimpleNamespace(
                args=(
                    task.doc_to_text(doc),
                    task.config.generation_kwargs,
                    task.doc_to_visual,
                    doc_id,
                    name,
                    split,
                )
            )
            batch = prepare_batch([request], {name: {split: {doc_id: doc}}}, protocol)
            settings = rules.generation(
                dict(task.config.generation_kwargs or {}), default_max_new_tokens, generation_overrides
            )
            inputs = encode_batch(
                processor, config, batch.prompts, batch.images, batch.images_per_row, protocol
            )
            sizes = batch.image_sizes_of(inputs.get("image_sizes"), 0)
            layouts = [config_layout(config, size) for size in sizes]
            yield {
                "task": name,
                "doc_id": doc_id,
                "prompt": batch.prompts[0],
                "input_ids": inputs["input_ids"][0].tolist(),
                "image_sizes": sizes,
                "grid": [list(layout.grid) for layout in layouts],
                "visual_tokens": [layout.num_tokens for layout in layouts],
                "gen_kwargs": {**settings.generate_kwargs(), "until": list(settings.until)},
            }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--limit", type=int, default=1, help="documents per task (the first N)")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=PROTOCOLS)
    parser.add_argument(
        "--pretrained", default="tiny", help="whose processor tokenises (hub id, folder, tiny)"
    )
    parser.add_argument(
        "--generation-overrides", default=None, help="under llava: JSON object applied on LLaVA's settings"
    )
    args = parser.parse_args(argv)
    if args.generation_overrides and args.protocol != "llava":
        parser.error(
            "--generation-overrides apply under --protocol llava only (the plugin refuses them otherwise)"
        )
    try:
        overrides = json.loads(args.generation_overrides) if args.generation_overrides else None
    except ValueError as err:
        parser.error(f"--generation-overrides is not JSON ({err}): {args.generation_overrides!r}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        for row in show_inputs(tasks, args.limit, args.protocol, args.pretrained, overrides):
            print(json.dumps(row, ensure_ascii=False), flush=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"show_inputs: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
