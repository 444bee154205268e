"""`make data` against a fake hub in a temp folder (no network): only the evaluated split's files are
fetched, an interrupted download resumes, and no half-written dataset is ever left where a task reads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest

from globalcom2.data import download
from globalcom2.data.benchmarks import Benchmark, HubPart
from globalcom2.data.local import SOURCE_FILE
from globalcom2.hub import OFFLINE_FLAGS

REPO = "fake-org/FakeVQA"


class FakeHub:
    """A dataset repo with a validation split in two parquet shards and a large test split."""

    def __init__(self, root: Path, card: dict | None = None) -> None:
        self.files: dict[str, Path] = {}
        shards = {
            "data/validation-00000-of-00002.parquet": range(0, 3),
            "data/validation-00001-of-00002.parquet": range(3, 5),
            "data/test-00000-of-00001.parquet": range(100, 200),
        }
        for name, rows in shards.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(
                {"question_id": list(rows), "question": [f"q{i}" for i in rows]}
            ).to_parquet(str(path))
            self.files[name] = path
        self.card = card
        self.cache: dict[str, str] = {}
        self.requested: list[str] = []
        self.fail_on: str | None = None

    def install(self, monkeypatch) -> None:
        hub = self

        class Api:
            def dataset_info(self, repo, revision=None, token=None, files_metadata=False, timeout=None):
                assert repo == REPO
                siblings = [SimpleNamespace(rfilename=n, size=p.stat().st_size) for n, p in hub.files.items()]
                return SimpleNamespace(sha="0123456789abcdef", siblings=siblings, card_data=hub.card)

        def hf_hub_download(repo, filename, repo_type=None, revision=None, token=None):
            hub.requested.append(filename)
            if filename == hub.fail_on:
                hub.fail_on = None
                raise ConnectionError("connection reset (simulated)")
            hub.cache[filename] = str(hub.files[filename])
            return hub.cache[filename]

        def try_to_load_from_cache(repo, filename, revision=None, repo_type=None):
            return hub.cache.get(filename)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", try_to_load_from_cache)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_fake_hub")
        for flag in OFFLINE_FLAGS:
            monkeypatch.setenv(flag, "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # latched by conftest's "1"


BENCH = Benchmark("fakevqa", "Fake VQA", ("fakevqa_local",), (HubPart(REPO, None, "validation"),))


def test_only_the_evaluated_split_is_fetched_and_saved(tmp_path, monkeypatch, capsys):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    target = download.download_benchmark(BENCH, tmp_path / "data")
    assert sorted(hub.requested) == [
        "data/validation-00000-of-00002.parquet",
        "data/validation-00001-of-00002.parquet",
    ]
    saved = datasets.load_from_disk(str(target))
    assert list(saved) == ["validation"] and saved["validation"]["question_id"] == [0, 1, 2, 3, 4]
    source = json.loads((target / SOURCE_FILE).read_text())["parts"]["."]
    assert source["rows"] == 5 and len(source["files"]) == 2 and source["bytes"] > 0
    out = capsys.readouterr().out
    assert "2 file(s)" in out and "GiB" in out and "[2/2]" in out


def test_an_interrupted_download_resumes_and_never_leaves_a_half_dataset(tmp_path, monkeypatch, capsys):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    hub.fail_on = "data/validation-00001-of-00002.parquet"
    with pytest.raises(ConnectionError):
        download.download_benchmark(BENCH, tmp_path / "data")
    assert not (tmp_path / "data" / "fakevqa").exists()  # nothing a task could read
    assert not [p for p in (tmp_path / "data").iterdir()]  # no staging left behind either
    hub.requested.clear()
    capsys.readouterr()
    target = download.download_benchmark(BENCH, tmp_path / "data")
    assert hub.requested == ["data/validation-00001-of-00002.parquet"]  # the first shard came from cache
    assert "cached" in capsys.readouterr().out
    assert datasets.load_from_disk(str(target))["validation"].num_rows == 5


def test_the_dataset_cards_data_files_decide_the_split(tmp_path, monkeypatch):
    card = {
        "configs": [
            {"config_name": "other", "data_files": [{"split": "validation", "path": "data/test-*"}]},
            {
                "config_name": "default",
                "data_files": [{"split": "validation", "path": ["data/validation-00001-*"]}],
            },
        ]
    }
    hub = FakeHub(tmp_path / "hub", card=card)
    hub.install(monkeypatch)
    assert download.split_files(REPO, None, "validation", "0123", "t") == [
        (
            "data/validation-00001-of-00002.parquet",
            hub.files["data/validation-00001-of-00002.parquet"].stat().st_size,
        )
    ]
    with pytest.raises(download.DownloadUnavailableError, match="no files for split 'train'"):
        download.split_files(REPO, None, "train", "0123", "t")


def test_a_complete_download_is_kept_and_anything_else_in_its_place_is_refused(tmp_path, monkeypatch, capsys):
    """Only a hub download of the parts ``BENCHMARKS`` names counts as present; fixture rows or another
    config's download used to be reported as "already present" and kept, exit code 0."""
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    target = download.download_benchmark(BENCH, tmp_path / "data")
    hub.requested.clear()
    assert download.download_benchmark(BENCH, tmp_path / "data") == target and hub.requested == []
    assert "already present (hub)" in capsys.readouterr().out

    source = target / SOURCE_FILE
    record = json.loads(source.read_text())
    other = Benchmark("fakevqa", "Fake VQA", ("fakevqa_local",), (HubPart(REPO, "other", "validation"),))
    with pytest.raises(
        download.DownloadUnavailableError, match=r"was downloaded from .*'config': None"
    ) as err:
        download.download_benchmark(other, tmp_path / "data")
    assert err.value.code == 4 and "--force" in str(err.value)

    source.write_text(json.dumps({**record, "kind": "synthetic-fixture"}))
    with pytest.raises(download.DownloadUnavailableError, match="holds 'synthetic-fixture' rows") as err:
        download.download_benchmark(BENCH, tmp_path / "data")
    assert err.value.code == 4 and hub.requested == []
    assert json.loads(source.read_text())["kind"] == "synthetic-fixture"  # kept as it was

    download.download_benchmark(BENCH, tmp_path / "data", force=True)
    assert json.loads(source.read_text())["kind"] == "hub"


def test_a_benchmark_list_that_names_nothing_is_refused_not_read_as_all(capsys):
    """``--benchmarks ,`` used to start downloading all ten benchmarks (hundreds of GB)."""
    assert download.main(["--benchmarks", ","]) == 2
    assert "names no benchmark" in capsys.readouterr().err


def test_folders_a_killed_download_left_are_named_with_their_size(tmp_path, monkeypatch, capsys):
    """A SIGKILL leaves ``.<key>.*`` staging and cache folders (tens of GB for VQAv2) that nothing names;
    the next download lists them (and deletes nothing another download may be writing)."""
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    left = tmp_path / "data" / ".fakevqa.cache.abc123"
    left.mkdir(parents=True)
    (left / "part.arrow").write_bytes(b"x" * 2048)
    download.download_benchmark(BENCH, tmp_path / "data")
    err = capsys.readouterr().err
    assert f"1 folder(s) left by an interrupted download, 0.00 GiB: {left}" in err
    assert left.is_dir()
