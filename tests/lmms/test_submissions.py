"""EvalAI submission files for VQAv2 test-dev and VizWiz test (``globalcom2.lmms.submissions``)."""

from __future__ import annotations

import json

import pytest

from globalcom2.data.fixtures import write_fixtures
from globalcom2.lmms import api
from globalcom2.lmms.submissions import (
    VIZWIZ_SUBMISSION,
    VQAV2_ANSWERS,
    VQAV2_QUESTIONS,
    VQAV2_SUBMISSION,
    main,
    pad_vqav2,
)
from globalcom2.paths import DATA_DIR_ENV

TASKS = ["vqav2_testdev_local", "vizwiz_vqa_test_local"]


@pytest.fixture(scope="module")
def lm():
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    return GlobalCom2LlavaNext(
        pretrained="tiny",
        method="random",
        retention_ratio=0.5,
        protocol="llava",
        profile=False,
        generation_overrides={"max_new_tokens": 3},
    )


def read(path):
    return json.loads(path.read_text())


def test_test_splits_write_uploadable_files_next_to_the_results(lm, tmp_path, monkeypatch):
    data = write_fixtures(tmp_path / "data", ["vqav2_testdev", "vizwiz_vqa_test"])
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    # the official test2015 question file: the test-dev ids among others, in the file's own order
    test2015 = [7, 1000003, 1000001, 9, 1000002]
    questions = {"questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in test2015]}
    (data / VQAV2_QUESTIONS).write_text(json.dumps(questions))

    lm.reset_records()
    results = api.evaluate(lm, TASKS, output_path=tmp_path / "cell")
    assert results["results"]["vqav2_testdev_local"]["submission,none"] == 3
    answers = {r.doc_id: r.answer for r in lm.records if r.task == "vqav2_testdev_local"}
    folder = tmp_path / "cell" / "submissions"

    written = read(folder / VQAV2_ANSWERS)
    assert sorted(e["question_id"] for e in written) == [1000001, 1000002, 1000003]
    padded = read(folder / VQAV2_SUBMISSION)
    assert [e["question_id"] for e in padded] == test2015, "every test2015 question, in the file's order"
    assert [e["answer"] for e in padded if e["question_id"] in (7, 9)] == ["", ""]
    by_id = {e["question_id"]: e["answer"] for e in padded}
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    process = EvalAIAnswerProcessor()
    assert [by_id[1000001 + i] for i in range(3)] == [process(answers[i]) for i in range(3)]

    vizwiz = read(folder / VIZWIZ_SUBMISSION)
    assert [e["image"] for e in vizwiz] == [f"VizWiz_test_{i:08d}.jpg" for i in range(3)]
    assert all(set(e) == {"image", "answer"} for e in vizwiz)
    assert not list(folder.glob("partial_*"))


def test_a_partial_run_never_writes_an_upload_file(lm, tmp_path, monkeypatch):
    """A padded file of a partial run would be accepted by EvalAI and scored near zero; nor may an earlier
    full run's upload stay beside it in the same output path."""
    data = write_fixtures(tmp_path / "data", ["vqav2_testdev", "vizwiz_vqa_test"])
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    (data / VQAV2_QUESTIONS).write_text(
        json.dumps({"questions": [{"question_id": 1000001 + i} for i in range(3)]})
    )
    folder = tmp_path / "cell" / "submissions"
    api.evaluate(lm, TASKS, output_path=tmp_path / "cell")  # an earlier full run into the same path
    assert {VQAV2_SUBMISSION, VIZWIZ_SUBMISSION} <= {p.name for p in folder.iterdir()}
    api.evaluate(lm, TASKS, output_path=tmp_path / "cell", limit=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "partial_vizwiz_vqa_test.json",
        "partial_vqav2_testdev.json",
    ]
    assert len(read(folder / "partial_vqav2_testdev.json")) == 2


def test_the_test_splits_need_an_output_path_before_generating(lm, fixture_data):
    from globalcom2.lmms.preflight import PreflightError

    lm.reset_records()
    with pytest.raises(PreflightError, match=r"write EvalAI submission files.*give an output_path"):
        api.evaluate(lm, TASKS)
    assert lm.records == [], "nothing was generated"


def test_without_the_question_file_the_answers_are_kept_and_padding_is_explained(lm, tmp_path, monkeypatch):
    from loguru import logger

    data = write_fixtures(tmp_path / "data", ["vqav2_testdev"])
    monkeypatch.setenv(DATA_DIR_ENV, str(data))
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        api.evaluate(lm, ["vqav2_testdev_local"], output_path=tmp_path / "cell")
    finally:
        logger.remove(sink)
    folder = tmp_path / "cell" / "submissions"
    assert len(read(folder / VQAV2_ANSWERS)) == 3 and not (folder / VQAV2_SUBMISSION).exists()
    assert any("pad-vqav2" in str(m) and VQAV2_QUESTIONS in str(m) for m in messages)


def test_pad_vqav2_follows_llavas_converter_and_refuses_a_wrong_question_file(tmp_path, capsys):
    answers = [{"question_id": 3, "answer": "two"}, {"question_id": 1, "answer": "yes"}]
    assert pad_vqav2(answers, [1, 2, 3]) == [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "two"},
    ]
    with pytest.raises(ValueError, match="1 answered questions are not in the test2015 question file"):
        pad_vqav2(answers, [1, 2])

    (tmp_path / "answers.json").write_text(json.dumps(answers))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": q} for q in (1, 2, 3)]}))
    out = tmp_path / "upload" / "vqav2.json"
    argv = ["pad-vqav2", "--answers", str(tmp_path / "answers.json"), "--questions", str(tmp_path / "q.json")]
    assert main([*argv, "--out", str(out)]) == 0
    assert [e["question_id"] for e in read(out)] == [1, 2, 3]
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    bad = [
        "pad-vqav2",
        "--answers",
        str(tmp_path / "answers.json"),
        "--questions",
        str(tmp_path / "bad.json"),
    ]
    assert main([*bad, "--out", str(out)]) == 2
    assert "not a VQA question file" in capsys.readouterr().err
