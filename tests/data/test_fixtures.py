"""Synthetic fixtures: written whole or not at all, never over downloaded data, and only what was named."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from globalcom2.data import fixtures
from globalcom2.data.local import SOURCE_FILE, read_source_file


def test_an_interrupted_write_leaves_no_rows_without_their_synthetic_label(tmp_path, monkeypatch):
    """The rows used to be saved in place and the source record written last: cut off in between, the
    folder passed the data checks with no record saying its rows are synthetic."""

    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == SOURCE_FILE:
            raise KeyboardInterrupt  # after the rows, before the record
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        fixtures.write_fixtures(tmp_path, ["mme"])
    assert list(tmp_path.iterdir()) == []


def test_downloaded_data_is_not_replaced_by_fixture_rows_without_force(tmp_path):
    fixtures.write_fixtures(tmp_path, ["pope"])
    source = tmp_path / "pope" / SOURCE_FILE
    source.write_text(json.dumps({**json.loads(source.read_text()), "kind": "hub"}))
    with pytest.raises(FileExistsError, match="holds data downloaded from the hub"):
        fixtures.write_fixtures(tmp_path, ["pope"])
    assert read_source_file(tmp_path / "pope")["kind"] == "hub"
    fixtures.write_fixtures(tmp_path, ["pope"], force=True)
    assert read_source_file(tmp_path / "pope")["kind"] == "synthetic-fixture"
    assert datasets.load_from_disk(str(tmp_path / "pope"))["test"].num_rows > 0


def test_only_the_named_fixtures_are_written_and_unknown_names_are_refused(tmp_path):
    assert list(fixtures.write_fixtures(tmp_path, []).iterdir()) == []  # used to write all twelve
    with pytest.raises(ValueError, match=r"unknown fixture benchmarks \['popee'\]; choose from \[.*'pope'"):
        fixtures.write_fixtures(tmp_path, ["popee"])
    with pytest.raises(SystemExit):
        fixtures.main(["--out", str(tmp_path), "--benchmarks", ","])
