"""A checkpoint's identity is its content: the hub commit it loads, or its files' SHA-256, so the results
store never serves a cell computed with other weights under the same name (``globalcom2.models.fingerprint``)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from helpers import fake_hub_repo

from globalcom2 import hub
from globalcom2.models import fingerprint
from globalcom2.models.fingerprint import checkpoint_identity, file_sha256, folder_digests
from globalcom2.models.tiny_trained import CHECKPOINT_DIR

REPO = "example-org/llava-next-test-repo"  # made up: no local folder of that name can shadow it


@pytest.fixture
def digest_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GLOBALCOM2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sha256"


def test_a_folder_is_named_by_the_sha256_of_its_visible_files(tmp_path, digest_cache):
    folder = tmp_path / "ckpt"
    (folder / ".cache").mkdir(parents=True)  # hf download --local-dir's bookkeeping: not content
    (folder / ".cache" / "x.metadata").write_text("downloaded at noon")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("notes")  # files no loader reads are not content either
    (folder / "optimizer.pt").write_bytes(b"state")
    for record in (
        "training_record.json",
        "trainer_state.json",
        "training_args.bin",
        "optimizer.bin",
        "log.txt",
    ):
        (folder / record).write_text("training, not loading")  # their suffixes are loaded ones; they are not
    assert folder_digests(folder) == {
        "config.json": hashlib.sha256(b"{}").hexdigest(),
        "model.safetensors": hashlib.sha256(b"weights").hexdigest(),
    }
    assert checkpoint_identity(str(folder)) == {"files": folder_digests(folder)}


def test_the_digest_cache_is_used_for_an_unchanged_file_and_missed_for_a_rewritten_one(
    tmp_path, digest_cache
):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first")
    assert file_sha256(weights) == hashlib.sha256(b"first").hexdigest()
    (entry,) = digest_cache.iterdir()
    entry.write_text("f" * 64)  # a planted digest is served: the cache is read, the file is not
    assert file_sha256(weights) == "f" * 64
    for corrupt in (b"not a digest", b"\xff" * 64):  # a damaged entry is ignored, never served or fatal
        entry.write_bytes(corrupt)
        assert file_sha256(weights) == hashlib.sha256(b"first").hexdigest()
    weights.write_bytes(b"second")  # rewritten in place: the size alone already changes the key
    assert file_sha256(weights) == hashlib.sha256(b"second").hexdigest()
    stat = weights.stat()
    weights.write_bytes(b"third!")  # the same size, times set back: the change time still moves
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(weights) == hashlib.sha256(b"third!").hexdigest()


def test_an_unwritable_digest_cache_still_gives_the_digest(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GLOBALCOM2_CACHE", str(blocker))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    assert file_sha256(weights) == hashlib.sha256(b"abc").hexdigest()


def test_the_shipped_and_built_checkpoints_are_named_by_their_files(digest_cache):
    trained = checkpoint_identity("tiny-trained")
    expected = hashlib.sha256((CHECKPOINT_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert trained["files"]["model.safetensors"] == expected
    assert "config.json" in trained["files"] and "tokenizer.json" in trained["files"]
    assert "training_record.json" not in trained["files"]  # prose about the run: an edit re-runs nothing
    tiny = checkpoint_identity("tiny")
    assert set(tiny["files"]) >= {"config.json", "model.safetensors"}
    assert tiny["files"]["model.safetensors"] != expected
    assert checkpoint_identity("tiny:1") != tiny  # another seed, other weights


def test_random_weights_have_no_content_identity():
    assert checkpoint_identity(REPO, random_init=True) is None


def test_a_hub_id_offline_is_named_by_the_cached_snapshot_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    missing = checkpoint_identity(REPO)  # not cached: a dry run still lists the cell, saying why
    assert missing["unresolved"] == REPO
    assert "is not in the local Hugging Face cache and the hub is offline" in missing["reason"]
    older, newer = "a" * 40, "b" * 40
    repo_folder = fake_hub_repo(tmp_path, REPO, {older: None, newer: None}, main=newer)
    assert checkpoint_identity(REPO) == {"hub": REPO, "commit": newer}
    # A pinned revision: a commit names its own snapshot, a branch or tag its ref; both are the commit.
    assert checkpoint_identity(REPO, revision=older) == {"hub": REPO, "commit": older}
    (repo_folder / "refs" / "v1.0").write_text(older)
    assert checkpoint_identity(REPO, revision="v1.0") == checkpoint_identity(REPO, revision=older)
    uncached = checkpoint_identity(REPO, revision="c" * 40)
    assert uncached["unresolved"] == REPO and f"{REPO}@{'c' * 40}" in uncached["reason"]


def test_a_hub_id_online_is_resolved_as_from_pretrained_resolves_it(tmp_path, monkeypatch):
    """Through ``hf_hub_download(repo, "config.json", revision=...)``: the snapshot it returns (the hub's
    revision, or the cache's when the hub is unreachable) names the commit; a failure leaves the weights
    unresolved."""
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    repo_folder = fake_hub_repo(tmp_path, REPO, {"b" * 40: None}, main="b" * 40)
    newer = repo_folder / "snapshots" / ("b" * 40)
    asked = []

    def download(repo, filename, revision=None, **kwargs):
        asked.append((repo, filename, revision))
        return str(newer / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    assert checkpoint_identity(REPO) == {"hub": REPO, "commit": "b" * 40}
    assert checkpoint_identity(REPO, revision="v2") == {"hub": REPO, "commit": "b" * 40}
    assert asked == [(REPO, "config.json", None), (REPO, "config.json", "v2")]

    def unreachable(repo, filename, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    unresolved = checkpoint_identity(REPO)
    assert unresolved["unresolved"] == REPO and unresolved["reason"].endswith("no route to host")
    monkeypatch.setattr(
        "huggingface_hub.hf_hub_download", lambda repo, filename, **kw: str(tmp_path / "x.json")
    )
    assert "not in a Hugging Face cache snapshot" in checkpoint_identity(REPO)["reason"]


def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_unresolved(tmp_path):
    reason = checkpoint_identity("not/a/hub/id?")["reason"]  # in the config check's words
    assert reason.startswith("FileNotFoundError: pretrained='not/a/hub/id?': no such checkpoint folder"), (
        reason
    )
    reason = checkpoint_identity("not a repo!")["reason"]
    assert "pretrained='not a repo!' is neither an existing folder nor a hub id" in reason, reason


def test_what_cannot_be_read_is_unresolved_not_a_crash(tmp_path, digest_cache, monkeypatch):
    assert checkpoint_identity("tiny:x")["reason"].startswith("ValueError: pretrained='tiny:x'")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").mkdir()  # a name the loader would read, but not a file
    (folder / "config.json").symlink_to(folder / "gone.json")  # a dangling link
    assert checkpoint_identity(str(folder)) == {"files": {}}

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    (folder / "gone.json").write_text("{}")
    monkeypatch.setattr(fingerprint, "file_sha256", denied)
    unresolved = checkpoint_identity(str(folder))
    assert unresolved["unresolved"] == str(folder)
    assert unresolved["reason"].startswith("PermissionError") and "config.json" in unresolved["reason"]


def test_a_copied_folder_with_other_weights_has_another_identity(tmp_path, digest_cache):
    copy = tmp_path / "copy"
    shutil.copytree(CHECKPOINT_DIR, copy)
    same = checkpoint_identity(str(copy))
    assert same == checkpoint_identity("tiny-trained")  # the content, not the path
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_identity(str(copy)) != same
