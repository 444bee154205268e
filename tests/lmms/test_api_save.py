"""``api.save`` stores only whole files: lmms-eval's tracker writes in place and only warns when a write fails."""

from __future__ import annotations

import json

from globalcom2.lmms.api import written_problems


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
