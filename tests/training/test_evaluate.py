"""The test split is scored once, after the freeze: the guard of ``globalcom2.training.evaluate``."""

from __future__ import annotations

import json

import pytest

from globalcom2.training import evaluate


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    calls = []

    def fake_accuracy(folder, items):
        calls.append((folder, len(items), {item.index for item in items}))
        return {"overall": 12.5}

    monkeypatch.setattr(evaluate, "accuracy_by_type", fake_accuracy)
    (tmp_path / evaluate.RECORD_FILE).write_text(json.dumps({"validation": {"overall": 50.0}}))
    return tmp_path, calls


def test_the_test_split_is_refused_before_the_freeze(checkpoint):
    folder, calls = checkpoint
    with pytest.raises(ValueError, match="no 'freeze' entry"):
        evaluate.evaluate_frozen_test(folder, items=30)
    assert calls == [] and "test" not in evaluate.read_record(folder)


def test_after_the_freeze_it_is_scored_once_and_recorded(checkpoint):
    folder, calls = checkpoint
    record = evaluate.read_record(folder)
    evaluate.write_record(folder, {**record, "freeze": {"recipe_hash": "abc"}})
    assert evaluate.evaluate_frozen_test(folder, items=30) == {"overall": 12.5}
    assert calls == [(folder, 30, set(range(30)))]  # the first 30 test items
    assert evaluate.read_record(folder)["test"] == {"overall": 12.5}
    with pytest.raises(ValueError, match="already has a 'test' entry"):
        evaluate.evaluate_frozen_test(folder, items=30)
    assert len(calls) == 1


def test_zero_items_is_refused_not_read_as_the_whole_split(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--split", "test", "--items", "0"])
    assert "--items must be >= 1" in capsys.readouterr().err
