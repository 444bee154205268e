"""A hub checkpoint at a pinned revision: ``revision`` picks the commit, and the config check and the load read
that commit's snapshot (``globalcom2.hub.hub_file``, ``load_llava_next``). That a cell loads the commit its
identity names is tested with the cells (``tests/harness/test_cell_identity.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import fake_hub_repo

from globalcom2.models.loader import hub_commit, load_llava_next
from globalcom2.models.preload import checkpoint_config
from globalcom2.models.tiny import tiny_checkpoint
from globalcom2.run_spec import HYDRA_KEYS, RunSpec, parse_model_args, parse_run

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


def test_a_revision_of_a_local_folder_or_one_typed_by_a_parser_is_refused_with_the_callers_spelling():
    folder = str(tiny_checkpoint(0))
    with pytest.raises(ValueError, match=r"model.revision='v1' names a hub revision, but model.pretrained="):
        parse_run(pretrained=folder, revision="v1", keys=HYDRA_KEYS)  # before its files are hashed
    with pytest.raises(ValueError, match=r"revision must be a hub branch, tag or commit, got ''"):
        parse_run(pretrained=REPO, revision="")
    # Hydra types what it reads: 1.10 arrives as 1.1, a tag that may exist and is not the one meant
    for typed in (1.1, 123456, True):
        with pytest.raises(
            ValueError, match=rf"model.revision={typed!r} was read as a {type(typed).__name__}"
        ):
            parse_run(pretrained=REPO, revision=typed, keys=HYDRA_KEYS)


def test_model_args_keep_a_revision_as_written():
    args = parse_model_args(f"pretrained={REPO},revision=0123456,retention_ratio=0.25,method=random")
    assert args["revision"] == "0123456" and args["retention_ratio"] == 0.25  # the rest still typed
    assert RunSpec.from_model_args(args).model.revision == "0123456"


def test_offline_messages_say_which_revision_is_missing_and_how_to_get_it(hub_repo):
    with pytest.raises(FileNotFoundError) as short:
        checkpoint_config(REPO, revision="a" * 7)  # a short commit resolves only online
    assert "--revision aaaaaaa" in str(short.value) and "must be given in full (40 characters)" in str(
        short.value
    )
    assert "HF_DATASETS_OFFLINE" not in str(short.value)  # model files depend on the hub's switch alone


def test_a_hub_id_resolves_to_the_commit_it_loads_and_a_folder_to_none(hub_repo):
    assert hub_commit(REPO) == NEWER and hub_commit(REPO, OLDER) == OLDER
    assert hub_commit(tiny_checkpoint(0)) is None and hub_commit("tiny-trained") is None


def test_the_loader_asks_the_hub_once_and_reads_one_commit_after(hub_repo, monkeypatch):
    """Online, every ask of ``main`` may answer another commit: the loader asks once, then reads that commit's
    snapshot for the config check, the weights and the processor. The hub is simulated by the fake cache."""
    from huggingface_hub import try_to_load_from_cache

    asked: list[str | None] = []

    def fake_download(repo, filename, revision=None):
        asked.append(revision)
        return try_to_load_from_cache(repo, filename, revision=revision)

    monkeypatch.setattr("globalcom2.hub.hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    model, _ = load_llava_next(REPO)
    assert asked[0] is None and set(asked[1:]) == {NEWER}  # main once, then only the commit it resolved to
    assert torch.equal(first_weight(model), first_weight(load_llava_next(tiny_checkpoint(0))[0]))


def test_a_bad_name_gets_the_config_checks_message_from_the_commit_resolver():
    with pytest.raises(FileNotFoundError, match=r"pretrained='\./nope': no such checkpoint folder"):
        hub_commit("./nope")
    with pytest.raises(
        ValueError, match=r"pretrained='not a repo!' is neither an existing folder nor a hub id"
    ):
        load_llava_next("not a repo!")
