"""A hub checkpoint at a pinned revision: ``revision`` picks the commit, and the config check and the load read
that commit's snapshot (``globalcom2.hub.hub_file``, ``load_llava_next``). That a cell loads the commit its
identity names is tested with the cells (``tests/harness/test_cell_identity.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import fake_hub_repo

from globalcom2.models.loader import load_llava_next
from globalcom2.models.preload import checkpoint_config
from globalcom2.models.tiny import tiny_checkpoint
from globalcom2.run_spec import parse_run

REPO = "example-org/tiny-llava-next-hub"  # made up: served from a fake cache, offline
OLDER, NEWER = "a" * 40, "b" * 40


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    """``REPO`` cached with two commits: ``OLDER`` holds the tiny seed-1 weights, ``NEWER`` (main) seed 0."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshots = {OLDER: tiny_checkpoint(1), NEWER: tiny_checkpoint(0)}
    return fake_hub_repo(tmp_path / "hub", REPO, snapshots, main=NEWER)


def first_weight(model) -> torch.Tensor:
    return model.get_input_embeddings().weight


def test_the_loader_reads_the_pinned_commit_and_main_without_one(hub_repo):
    seed0, _ = load_llava_next(tiny_checkpoint(0))
    seed1, _ = load_llava_next(tiny_checkpoint(1))
    assert not torch.equal(first_weight(seed0), first_weight(seed1))  # the two commits differ
    main, processor = load_llava_next(REPO)
    assert torch.equal(first_weight(main), first_weight(seed0))
    older, _ = load_llava_next(REPO, revision=OLDER)
    assert torch.equal(first_weight(older), first_weight(seed1))
    assert processor.tokenizer.padding_side == "left"
    (hub_repo / "refs" / "v1").write_text(OLDER)  # a tag resolves through its ref, as a branch does
    tagged, _ = load_llava_next(REPO, revision="v1")
    assert torch.equal(first_weight(tagged), first_weight(seed1))
    with pytest.raises(FileNotFoundError, match=rf"{REPO}@{'c' * 40} is not in the local Hugging Face cache"):
        checkpoint_config(REPO, revision="c" * 40)


@pytest.mark.parametrize(
    ("pretrained", "extra", "message"),
    [
        ("tiny", {}, r"revision='v1': pretrained='tiny' is built or shipped by the project"),
        ("tiny-trained", {}, r"revision='v1': pretrained='tiny-trained' is built or shipped by the project"),
        (REPO, {"random_init": True}, r"revision='v1' with random_init=true: random weights come from no"),
    ],
)
def test_a_revision_where_there_is_none_is_refused_before_anything_loads(pretrained, extra, message):
    with pytest.raises(ValueError, match=message):
        parse_run(pretrained=pretrained, revision="v1", **extra)
    with pytest.raises(ValueError, match=message):
        load_llava_next(pretrained, revision="v1", **extra)


def test_a_revision_of_a_local_folder_is_refused_with_the_hydra_spelling(tmp_path):
    spec = parse_run(pretrained=str(tiny_checkpoint(0)), revision="v1")  # the disk is read later
    with pytest.raises(ValueError, match=r"model.revision='v1' names a hub revision, but model.pretrained="):
        checkpoint_config(
            spec.model.pretrained,
            revision="v1",
            keys={"revision": "model.revision", "pretrained": "model.pretrained"},
        )
    with pytest.raises(ValueError, match=r"revision must be a hub branch, tag or commit, got ''"):
        parse_run(pretrained=REPO, revision="")
