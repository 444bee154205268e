"""A checkpoint's identity is its content: the hub commit it loads, or its files' SHA-256, so the results
store never serves a cell computed with other weights under the same name (``globalcom2.models.fingerprint``)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from globalcom2.models import fingerprint
from globalcom2.models.fingerprint import checkpoint_identity, file_sha256, folder_digests
from globalcom2.models.tiny_trained import CHECKPOINT_DIR

REPO = "llava-hf/llava-v1.6-vicuna-7b-hf"


@pytest.fixture
def digest_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GLOBALCOM2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sha256"


def fake_hub_cache(root: Path, repo: str, commit: str) -> Path:
    """The layout huggingface_hub's cache gives one cached file: ``models--o--n/snapshots/<commit>/``."""
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    return snapshot


def test_a_folder_is_named_by_the_sha256_of_its_visible_files(tmp_path, digest_cache):
    folder = tmp_path / "ckpt"
    (folder / ".cache").mkdir(parents=True)  # hf download --local-dir's bookkeeping: not content
    (folder / ".cache" / "x.metadata").write_text("downloaded at noon")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
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
    weights.unlink()
    weights.write_bytes(b"second")  # a retrain rewrites the file: new inode and time, so a new key
    assert file_sha256(weights) == hashlib.sha256(b"second").hexdigest()


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
    assert "config.json" in trained["files"] and "training_record.json" in trained["files"]
    tiny = checkpoint_identity("tiny")
    assert set(tiny["files"]) >= {"config.json", "model.safetensors"}
    assert tiny["files"]["model.safetensors"] != expected
    assert checkpoint_identity("tiny:1") != tiny  # another seed, other weights


def test_random_weights_have_no_content_identity():
    assert checkpoint_identity(REPO, random_init=True) is None


def test_a_hub_id_offline_is_named_by_the_cached_snapshot_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "hub_offline", lambda: True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert checkpoint_identity(REPO) == {"unresolved": REPO}  # not cached: a dry run still lists the cell
    fake_hub_cache(tmp_path, REPO, "a" * 40)
    assert checkpoint_identity(REPO) == {"hub": REPO, "commit": "a" * 40}


def test_a_hub_id_online_is_named_by_the_hubs_main_and_falls_back_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path, REPO, "a" * 40)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda self, repo: SimpleNamespace(sha="b" * 40))
    assert checkpoint_identity(REPO) == {"hub": REPO, "commit": "b" * 40}  # what from_pretrained downloads

    def unreachable(self, repo):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    assert checkpoint_identity(REPO) == {"hub": REPO, "commit": "a" * 40}


def test_a_copied_folder_with_other_weights_has_another_identity(tmp_path, digest_cache):
    copy = tmp_path / "copy"
    shutil.copytree(CHECKPOINT_DIR, copy)
    same = checkpoint_identity(str(copy))
    assert same == checkpoint_identity("tiny-trained")  # the content, not the path
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_identity(str(copy)) != same
