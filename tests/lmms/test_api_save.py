"""``api.save`` stores only whole files: lmms-eval's tracker writes in place and only warns when a write fails."""

from __future__ import annotations

import copy
import json

import pytest

from globalcom2.lmms import api
from globalcom2.lmms.api import written_problems
from globalcom2.lmms.preflight import PreflightError


def _files(tmp_path, rows: list[str], results: str = '{"results": {}}'):
    results_file = tmp_path / "r_results.json"
    results_file.write_text(results, encoding="utf-8")
    samples = tmp_path / "r_samples_pope.jsonl"
    samples.write_text("".join(rows), encoding="utf-8")
    return results_file, samples


def test_whole_files_pass_and_a_line_separator_inside_an_answer_is_not_a_new_line(tmp_path):
    answer = json.dumps({"resps": "yes\u2028no"}, ensure_ascii=False)  # str.splitlines would cut it in two
    results_file, samples = _files(tmp_path, [answer + "\n", '{"resps": "no"}\n'])
    assert written_problems(results_file, {samples: 2}) == []


def test_a_cut_short_or_miscounted_or_broken_file_is_named(tmp_path):
    results_file, samples = _files(tmp_path, ['{"resps": "yes"}\n', '{"resps": "n'])  # the disk filled up
    assert written_problems(results_file, {samples: 2}) == [f"{samples} has 1 complete lines for 2 samples"]
    results_file, samples = _files(tmp_path, ['{"resps": "yes"}\n'])
    assert written_problems(results_file, {samples: 2}) == [f"{samples} has 1 complete lines for 2 samples"]
    results_file, samples = _files(tmp_path, ['{"resps": "yes"}\n', "{oops}\n"])
    (problem,) = written_problems(results_file, {samples: 2})
    assert problem.startswith(f"{samples} line 2 is not whole JSON")
    results_file, samples = _files(tmp_path, ['{"resps": "yes"}\n'], results='{"results": {"pope"')
    (problem,) = written_problems(results_file, {samples: 1})
    assert problem.startswith(f"{results_file} is not whole JSON")
    samples.unlink()
    assert written_problems(results_file, {samples: 1}) == [f"{samples} is missing"]


def _results() -> dict:
    sample = {
        "doc_id": 0, "doc": {}, "doc_hash": "h", "prompt_hash": "p", "target_hash": "x", "target": "a",
        "arguments": [["q", {}]], "resps": [["a"]], "filtered_resps": ["a"],
    }  # fmt: skip
    return {
        "results": {"t": {"acc,none": 1.0}}, "configs": {"t": {"task": "t"}}, "versions": {"t": 0},
        "config": {}, "samples": {"t": [sample]},
    }  # fmt: skip


def test_save_leaves_the_callers_results_as_they_were_and_names_an_unwritable_folder(tmp_path):
    """lmms-eval's tracker pops keys of the samples it writes: a second save of the same results then failed
    as if the disk had. A folder it cannot write failed with an AttributeError from inside the tracker."""
    results = _results()
    before = copy.deepcopy(results)
    first = api.save(results, tmp_path / "one", model_name="m")
    assert results == before
    second = api.save(results, tmp_path / "two", model_name="m")
    assert (
        first.read_text() and second.read_text() and len(list(second.parent.glob("*_samples_t.jsonl"))) == 1
    )
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match=r"could not write the results under .*afile"):
        api.save(_results(), tmp_path / "afile" / "sub", model_name="m")


def test_lmms_evals_response_cache_is_refused_for_our_model():
    """Answers served from the cache have no sample record, and a rank whose answers were all cached never
    reaches the records' gather."""

    class Ours:
        protocol = "lmms_eval"

    with pytest.raises(PreflightError, match=r"use_cache .* not supported with globalcom2_llava_next"):
        api.evaluate(Ours(), ["globalcom2_demo"], use_cache="/tmp/cache")
