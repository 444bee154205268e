"""A problem one rank finds after an evaluation reaches every rank (``globalcom2.lmms.api._on_every_rank``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed
import torch.multiprocessing

from globalcom2.lmms.api import _on_every_rank


def _rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine = ["task 't' read /elsewhere, not commit a"] if rank == 1 else []
        Path(out, f"{rank}.json").write_text(json.dumps(_on_every_rank(mine)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_problem_found_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Rank 1 alone finding other data would have raised there while rank 0 went on into the next
    collective and waited until the launcher killed it, ending the cell without the reason."""
    assert _on_every_rank(["x"]) == ["x"]  # no process group: as found
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = ["rank 1: task 't' read /elsewhere, not commit a"]
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)] == [expected, expected]
