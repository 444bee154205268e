"""The steps around an evaluation that need the outside world: MM-Vet judging, `make data`."""

from __future__ import annotations

import json

import pytest

from globalcom2.data import download
from globalcom2.data.benchmarks import paper_metric_value
from globalcom2.lmms import mmvet_judge


def samples_file(path, answers):
    lines = [
        {"doc_id": i, "target": target, "filtered_resps": [answer], "input": "..."}
        for i, (target, answer) in enumerate(answers)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


FIXTURE_TARGETS = ["4.50<OR>$4.50", "red<AND>white", "A cat sits in a box too small for it."]


def test_mmvet_without_a_key_gives_a_message_not_zeros(fixture_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "cat"], strict=True)
    )
    assert mmvet_judge.main(["--samples", str(samples)]) == 2
    message = capsys.readouterr().err
    assert "OPENAI_API_KEY is not set" in message and "No score was computed" in message
    assert list(tmp_path.iterdir()) == [samples]


@pytest.fixture
def graded_by(monkeypatch):
    """lmms-eval's MM-Vet grader with the GPT call replaced (the real one needs the network)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    from lmms_eval.tasks.mmvet import utils

    def install(grades):
        calls = iter(grades)
        monkeypatch.setattr(utils, "get_chat_response", lambda prompt, **kw: next(calls))
        monkeypatch.setattr(mmvet_judge, "probe_judge", lambda module, timeout_s: None)

    return install


def test_mmvet_judge_scores_with_lmms_evals_grader(fixture_data, tmp_path, graded_by):
    graded_by([("1.0", "gpt-test"), ("0.5", "gpt-test"), ("0.0", "gpt-test")])
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True)
    )
    result = mmvet_judge.judge(samples)
    assert paper_metric_value("MM-Vet", result) == pytest.approx(50.0)
    written = json.loads((tmp_path / "s_samples_mmvet_local_judged.json").read_text())
    assert written["results"] == result["results"] and len(written["grades"]) == 3


def test_a_judged_score_written_elsewhere_is_said_to_stay_out_of_the_tables(
    fixture_data, tmp_path, graded_by, capsys
):
    """``make tables`` finds the judge's file beside the cell's samples only: ``--out`` elsewhere left the
    score "not judged yet" in every table without a word."""
    graded_by([("1.0", "gpt-test"), ("0.5", "gpt-test"), ("0.0", "gpt-test")] * 2)
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True)
    )
    mmvet_judge.judge(samples, tmp_path / "elsewhere.json")
    assert "stays out of the tables" in capsys.readouterr().out
    mmvet_judge.judge(samples, tmp_path / "s_samples_mmvet_local_judged.json")  # the default, spelled out
    assert "stays out of the tables" not in capsys.readouterr().out


def test_mmvet_judge_refuses_to_score_when_the_judge_fails(fixture_data, tmp_path, graded_by):
    graded_by([("1.0", "gpt-test"), ("", ""), ("0.0", "gpt-test")])  # no answer from the judge for doc 1
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True)
    )
    with pytest.raises(RuntimeError, match="no grade for 1 samples"):
        mmvet_judge.judge(samples)
    assert not list(tmp_path.glob("*_judged.json"))


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        # never a number: lmms-eval asks again up to temperature 2, then counts 0; here the step stops
        (["Score: 0.8"] * 9, r"no grade for 1 samples \(question id: its last reply, .*'Score: 0.8'"),
        # a number out of range: lmms-eval would ask at temperature 0 forever
        (["1.5"] * 50, r"no grade in \[0, 1\] in 10 requests"),
    ],
)
def test_mmvet_judge_stops_at_a_reply_it_cannot_read_never_counting_0(
    fixture_data, tmp_path, graded_by, monkeypatch, replies, message
):
    from lmms_eval.tasks.mmvet import utils

    monkeypatch.setattr(utils.time, "sleep", lambda seconds: None)  # lmms-eval waits 5 s between tries
    graded_by([("1.0", "gpt-test"), *((reply, "gpt-test") for reply in replies)])
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True)
    )
    with pytest.raises(RuntimeError, match=message):
        mmvet_judge.judge(samples)
    assert not list(tmp_path.glob("*_judged.json"))
    assert not isinstance(utils.get_chat_response, mmvet_judge.RecordedJudge)  # lmms-eval's own is back


def test_mmvet_judge_keeps_a_grade_the_judge_gave_after_a_retry(
    fixture_data, tmp_path, graded_by, monkeypatch
):
    """An unreadable reply, the retry lmms-eval discards, then a grade: the grade stands, as in lmms-eval."""
    from lmms_eval.tasks.mmvet import utils

    monkeypatch.setattr(utils.time, "sleep", lambda seconds: None)
    replies = [("1.0", "gpt"), ("Score: 1", "gpt"), ("ignored", "gpt"), ("0.5", "gpt"), ("0.0", "gpt")]
    graded_by(replies)
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True)
    )
    assert [g["score"] for g in mmvet_judge.judge(samples)["grades"]] == [1.0, 0.5, 0.0]


def test_mmvet_judge_detects_data_that_changed(fixture_data, tmp_path, graded_by):
    graded_by([])
    samples = samples_file(tmp_path / "s.jsonl", [("another answer", "x")])
    with pytest.raises(ValueError, match="data changed since the run"):
        mmvet_judge.judge(samples)


def test_mmvet_judge_scores_all_documents_once_or_says_the_score_is_partial(
    fixture_data, tmp_path, graded_by
):
    """A run with a limit, or two samples files joined, must not give an ordinary-looking MM-Vet score."""
    answers = list(zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True))
    graded_by([("1.0", "gpt"), ("0.5", "gpt")])
    with pytest.raises(ValueError, match="cover 2 of the 3 MM-Vet documents"):
        mmvet_judge.judge(samples_file(tmp_path / "two.jsonl", answers[:2]))
    result = mmvet_judge.judge(samples_file(tmp_path / "two.jsonl", answers[:2]), allow_partial=True)
    assert result["partial"] is True and result["n-samples"]["mmvet_local"] == {"original": 3, "effective": 2}
    joined = tmp_path / "joined.jsonl"
    joined.write_text(samples_file(tmp_path / "a.jsonl", answers).read_text() * 2)
    with pytest.raises(ValueError, match="doc 0 has two samples"):
        mmvet_judge.judge(joined)


def test_the_time_limit_is_checked_before_every_judge_request():
    """One sample may take up to ten requests; the limit is checked before each, not only between samples."""
    import time

    requests = []
    judge = mmvet_judge.RecordedJudge(
        lambda prompt: requests.append(prompt) or ("0.5", "gpt"), time.monotonic() + 60, 60
    )
    assert judge("first") == ("0.5", "gpt")
    judge.deadline = time.monotonic() - 1  # the limit runs out during the sample
    with pytest.raises(RuntimeError, match="time limit of 60 s ran out while grading a sample"):
        judge("second")
    assert requests == ["first"]


def test_mmvet_judge_names_a_missing_samples_file(fixture_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    assert mmvet_judge.main(["--samples", str(tmp_path / "nope.jsonl")]) == 2
    assert f"no samples file at {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err


def test_mmvet_judge_names_an_unknown_api_type(fixture_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("API_TYPE", "foo")
    samples = samples_file(tmp_path / "s.jsonl", [(FIXTURE_TARGETS[0], "4.50")])
    assert mmvet_judge.main(["--samples", str(samples)]) == 2
    assert (
        "API_TYPE='foo' is not a judge API this step supports; valid: openai, azure"
        in capsys.readouterr().err
    )


def test_mmvet_judge_fails_fast_when_the_judge_cannot_be_reached(fixture_data, tmp_path, monkeypatch, capsys):
    """No network used to mean minutes of retries per sample; now one bounded probe, then a message."""
    import time

    from lmms_eval.llm_judge import get_server
    from lmms_eval.tasks.mmvet import utils

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    monkeypatch.setenv("OPENAI_API_URL", "http://127.0.0.1:9/v1")  # the discard port: nothing listens
    monkeypatch.setattr(utils, "server", get_server("openai", utils.server_config))
    monkeypatch.setattr(utils, "ServerConfig", utils.ServerConfig)  # undone after the test
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "cat"], strict=True)
    )
    started = time.monotonic()
    assert mmvet_judge.main(["--samples", str(samples), "--timeout", "5"]) == 2
    assert time.monotonic() - started < 60
    assert "did not answer a probe request" in capsys.readouterr().err
    assert not list(tmp_path.glob("*_judged.json"))


def test_mmvet_judge_stops_at_its_time_limit(fixture_data, tmp_path, graded_by):
    graded_by([("1.0", "gpt-test")] * 3)
    samples = samples_file(
        tmp_path / "s_samples_mmvet_local.jsonl", zip(FIXTURE_TARGETS, ["4.50", "red", "dog"], strict=True)
    )
    with pytest.raises(RuntimeError, match="time limit of 0 s ran out"):
        mmvet_judge.judge(samples, time_limit_s=1e-9)


def test_make_data_explains_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download.main(["--benchmarks", "pope"]) == 2
    assert "offline mode is set" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # latched on by conftest
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert download.main(["--benchmarks", "pope"]) == 2
    message = capsys.readouterr().err
    assert "no Hugging Face token" in message and "export HF_TOKEN" in message and "make data" in message
    assert download.main(["--benchmarks", "popee"]) == 2


def test_mmbench_en_string_index_is_cast_to_int(fixture_data):
    """The real MMBench `en` config stores `index` as a string; lmms-eval's evaluator compares it with
    int(1e6) and raised TypeError at the end of every cell (tests/lmms/test_end_to_end.py scores it)."""
    import datasets

    from globalcom2.lmms.task_utils import mmbench_docs

    raw = datasets.load_from_disk(str(fixture_data / "mmbench_en"))["dev"]
    assert raw.features["index"].dtype == "string"
    docs = mmbench_docs(raw)
    assert docs.features["index"].dtype == "int64"
    assert docs["index"] == [int(i) for i in raw["index"]]
    cn = datasets.load_from_disk(str(fixture_data / "mmbench_cn"))["dev"]
    assert mmbench_docs(cn) is cn  # already int64


def test_pope_reports_the_models_yes_ratio_not_the_answer_keys():
    """lmms-eval's pope_yes_ratio counts the ground truth, so a model that answers "yes" to everything reads
    0.5 on a balanced split; ours is LLaVA's (eval_pope.py L37), the share of the model's answers."""
    from lmms_eval.tasks.pope.utils import pope_aggregate_yes_ratio

    from globalcom2.lmms.preflight import task_yaml
    from globalcom2.lmms.task_utils import pope_answer_yes_ratio, pope_process_results
    from globalcom2.paths import PROJECT_ROOT

    docs = [{"question_id": i, "answer": answer} for i, answer in enumerate(["yes", "no", "yes", "no"])]
    scored = [pope_process_results(doc, ["Yes"]) for doc in docs]
    assert pope_aggregate_yes_ratio([s["pope_answer_yes_ratio"] for s in scored]) == 0.5  # the key's
    assert pope_answer_yes_ratio([s["pope_answer_yes_ratio"] for s in scored]) == 1.0  # the model's
    assert pope_answer_yes_ratio([pope_process_results(docs[0], ["no"])["pope_answer_yes_ratio"]]) == 0.0
    for split in ("adv", "pop", "random"):  # every split's metric list names what its scoring returns
        config = task_yaml(str(PROJECT_ROOT / "tasks" / "pope" / f"pope_{split}_local.yaml"))
        assert [m["metric"] for m in config["metric_list"]] == list(scored[0])
        assert "pope_yes_ratio" not in scored[0]


def test_gqa_is_also_scored_as_llava_scores_it(fixture_data):
    """LLaVA strips a trailing '.' and lower-cases, then compares exactly (convert_gqa_for_eval.py L14, GQA's
    eval.py); lmms-eval's exact_match also drops punctuation inside an answer. The GQA paper column reads
    LLaVA's, and the task keeps lmms-eval's own metric beside it."""
    from lmms_eval.api.metrics import exact_match_hf_evaluate
    from lmms_eval.utils import load_yaml_config

    from globalcom2.data.benchmarks import PAPER_METRICS
    from globalcom2.lmms.task_utils import llava_exact_match
    from globalcom2.lmms.tasks import LocalDataTask
    from globalcom2.paths import PROJECT_ROOT

    cases = {  # (gold, answer): LLaVA's verdict
        ("yes", "Yes."): True,
        ("yes", " yes \n"): True,
        ("t-shirt", "T-shirt"): True,
        ("tshirt", "t-shirt"): False,  # lmms-eval: a match
        ("st louis", "St. Louis"): False,  # lmms-eval: a match
        ("table", "table.."): True,  # every trailing '.', as str.rstrip('.')
        ("left", "left, I think"): False,
    }
    for (gold, answer), verdict in cases.items():
        assert llava_exact_match([gold], [answer.strip()]) == float(verdict), (gold, answer)
    lenient = exact_match_hf_evaluate(
        [a.strip() for _, a in cases], [g for g, _ in cases], ignore_case=True, ignore_punctuation=True
    )
    assert lenient["exact_match"] > sum(cases.values()) / len(cases)
    with pytest.raises(ValueError, match="one prediction per gold answer"):
        llava_exact_match(["yes"], [])

    yaml_path = str(PROJECT_ROOT / "tasks" / "gqa" / "gqa_local.yaml")
    task = LocalDataTask(load_yaml_config(yaml_path=yaml_path, mode="full"))  # as lmms-eval reads it
    metrics = [m["metric"] for m in task.config.metric_list]
    assert metrics[0] == "exact_match" and metrics[1] is llava_exact_match  # lmms-eval's own, then ours
    assert task.config.metric_list[0]["ignore_punctuation"] is True  # inherited as lmms-eval wrote it
    assert PAPER_METRICS["GQA"].metric == "llava_exact_match"


def test_extra_metrics_beside_a_process_results_are_refused_when_the_task_loads(fixture_data):
    """lmms-eval lets a process_results compute every metric, and would key an added one by its function and
    never compute it: the missing score would show only after the whole evaluation."""
    from lmms_eval.utils import load_yaml_config

    from globalcom2.lmms.tasks import LocalDataTask
    from globalcom2.paths import PROJECT_ROOT

    config = load_yaml_config(yaml_path=str(PROJECT_ROOT / "tasks" / "gqa" / "gqa_local.yaml"), mode="full")
    with pytest.raises(ValueError, match="extra_metrics cannot be added to a task with a process_results"):
        LocalDataTask({**config, "process_results": len})
