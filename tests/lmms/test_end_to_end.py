"""Every offline task, scored by lmms-eval's own code on the tiny model: CLI, Python API, batching,
data parallelism, failures.

The tiny model answers gibberish, so the scores are mostly 0; what these tests establish is that
prompts, answer extraction and scoring are wired to real-schema data, that every metric is produced,
and that batching and process count do not change a single generated token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from lmms_helpers import ALL_TASKS, REPO, run_cli

from globalcom2.data.benchmarks import PAPER_METRICS, paper_metric_value
from globalcom2.lmms import api
from globalcom2.lmms.plugin import MODEL_ID, GlobalCom2LlavaNext
from globalcom2.sample_records import read_jsonl

# Claims that rest on transformers internals: CI runs them on every supported transformers.
pytestmark = pytest.mark.exactness

# One metric each task must report (lmms-eval's names).
EXPECTED_METRIC = {
    "vqav2_val_local": "exact_match",
    "gqa_local": "exact_match",
    "vizwiz_vqa_val_local": "exact_match",
    "scienceqa_img_local": "exact_match",
    "textvqa_val_local": "exact_match",
    "pope_adv_local": "pope_f1_score",
    "pope_pop_local": "pope_f1_score",
    "pope_random_local": "pope_f1_score",
    "mme_local": "mme_perception_score",
    "mmbench_en_dev_static_local": "gpt_eval_score",
    "mmbench_cn_dev_static_local": "gpt_eval_score",
    "mmvet_local": "judge_pending",
    "globalcom2_demo": "exact_match",
}
GEN = "max_new_tokens=3"  # the tiny model never stops by itself; real runs use each task's settings


def model(method: str = "random", **kwargs):
    return GlobalCom2LlavaNext(pretrained="tiny", method=method, retention_ratio=0.25, **kwargs)


def scores(results, task):
    """The task's metric values (standard errors depend on bootstrap settings, which differ by entry point)."""
    return {k: v for k, v in results["results"][task].items() if "stderr" not in k}


def answers(results, task):
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


def test_python_api_scores_every_offline_task(fixture_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the CWD would show up here
    lm = model(batch_size=4, records_path=str(tmp_path / "records.jsonl"))
    results = api.evaluate(lm, ALL_TASKS, output_path=tmp_path / "out", limit=6, gen_kwargs=GEN)

    for task, metric in EXPECTED_METRIC.items():
        value = results["results"][task][f"{metric},none"]
        assert isinstance(value, (int, float)) and math.isfinite(value), (task, value)
        assert len(results["samples"][task]) == results["n-samples"][task]["effective"] > 0
    assert results["results"]["mmvet_local"]["judge_pending,none"] == 3  # answers recorded, not scored
    for task in ("pope_adv_local", "pope_pop_local", "pope_random_local"):  # the model's yes ratio
        said_yes = [s["filtered_resps"][0].lower().strip() == "yes" for s in results["samples"][task]]
        assert results["results"][task]["pope_answer_yes_ratio,none"] == sum(said_yes) / len(said_yes)
        assert "pope_yes_ratio,none" not in results["results"][task]
    gqa = results["samples"]["gqa_local"]  # the paper column's GQA, as LLaVA scores it
    as_llava = [s["filtered_resps"][0].strip().rstrip(".").lower() == s["target"] for s in gqa]
    assert results["results"]["gqa_local"]["llava_exact_match,none"] == pytest.approx(
        sum(as_llava) / len(gqa)
    )
    for column, spec in PAPER_METRICS.items():
        if spec.source == "results":
            assert math.isfinite(paper_metric_value(column, results))
    with pytest.raises(KeyError, match="gpt_eval_score"):
        paper_metric_value("MM-Vet", results)  # no judge, no number (never a silent 0)

    total = sum(len(s) for s in results["samples"].values())
    records = lm.gather_records()
    assert len(records) == total == len(read_jsonl(tmp_path / "records.jsonl"))
    assert all(r.visual_tokens_after < r.visual_tokens_before for r in records)
    assert all(r.prefill_s is not None and 0 < r.prefill_s <= r.total_s for r in records)
    assert all(r.peak_memory_bytes is None and "CPU" in r.peak_memory_note for r in records)

    written = api.save(results, tmp_path / "out", model_name="tiny")
    assert json.loads(written.read_text())["results"].keys() == set(ALL_TASKS)
    assert {p.name.split("_samples_")[1][:-6] for p in written.parent.glob("*_samples_*.jsonl")} == set(
        ALL_TASKS
    )
    assert (tmp_path / "out" / "submissions").is_dir() and not (tmp_path / "submissions").exists()
    assert not list(fixture_data.rglob("cache-*")), "tasks must not write into the data directory"


@pytest.mark.slow
def test_cli_scores_every_offline_task(fixture_data, tmp_path):
    out = tmp_path / "out"
    args = [
        *("-m", "lmms_eval", "--model", MODEL_ID),
        *("--model_args", "pretrained=tiny,method=random,retention_ratio=0.25"),
        *("--tasks", ",".join(ALL_TASKS), "--include_path", str(REPO / "tasks")),
        *("--batch_size", "2", "--limit", "2", "--gen_kwargs", GEN),  # even limits keep MME's pairs whole
        *("--output_path", str(out), "--log_samples", "--timezone", "UTC"),
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = out.glob("tiny/*_results.json")
    results = json.loads(results_file.read_text())
    for task, metric in EXPECTED_METRIC.items():
        assert f"{metric},none" in results["results"][task], task
        assert len(list(out.glob(f"tiny/*_samples_{task}.jsonl"))) == 1, task


def test_batch_size_4_gives_the_same_answers_as_batch_size_1(fixture_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = ["globalcom2_demo"]  # ten aspect ratios: the rows of a batch are padded differently
    runs = {}
    for name, kwargs in {
        "bs1": {"batch_size": 1},
        "bs4": {"batch_size": 4},
        "bs4_unprofiled": {"batch_size": 4, "profile": False},
    }.items():
        lm = model(**kwargs)
        results = api.evaluate(lm, tasks, limit=8, gen_kwargs="max_new_tokens=4")
        runs[name] = (results, {(r.task, r.doc_id): r for r in lm.records})
    (bs1, rec1), (bs4, rec4), (plain, rec_plain) = runs.values()
    assert max(r.batch_size for r in rec4.values()) == 4
    for task in tasks:
        assert answers(bs1, task) == answers(bs4, task) == answers(plain, task)
        assert scores(bs1, task) == scores(bs4, task)
    # The decoded text hides differences between invalid-UTF-8 tokens; the token ids do not.
    assert rec1.keys() == rec4.keys() == rec_plain.keys()
    for key in rec1:
        assert rec1[key].output_token_ids == rec4[key].output_token_ids == rec_plain[key].output_token_ids, (
            key
        )
        assert rec1[key].visual_tokens_after == rec4[key].visual_tokens_after
    assert len({tuple(r.output_token_ids) for r in rec1.values()}) > 1  # the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["random", "dart"]
)  # a pre-LLM method, and an in-LLM one that reads the device
def test_two_processes_give_the_same_scores_as_one(fixture_data, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    tasks = ["globalcom2_demo", "pope_adv_local", "mme_local"]  # MME pairs are split across the ranks
    lm = model(method, batch_size=2)
    single = api.evaluate(lm, tasks, limit=6, gen_kwargs=GEN)
    single_records = {(r.task, r.doc_id): r.output_token_ids for r in lm.records}

    out, records = tmp_path / "out", tmp_path / "records.jsonl"
    args = [
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "globalcom2.lmms"),
        *(
            "--model",
            MODEL_ID,
            "--model_args",
            f"pretrained=tiny,method={method},retention_ratio=0.25,records_path={records}",
        ),
        *("--tasks", ",".join(tasks), "--batch_size", "2", "--limit", "6", "--gen_kwargs", GEN),
        *("--output_path", str(out), "--log_samples", "--timezone", "UTC"),
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = out.glob("tiny/*_results.json")
    double = json.loads(results_file.read_text())
    for task in tasks:
        assert scores(double, task) == scores(single, task), task
        logged = [
            json.loads(line)
            for line in next(out.glob(f"tiny/*_samples_{task}.jsonl")).read_text().splitlines()
        ]
        assert {s["doc_id"]: s["filtered_resps"] for s in logged} == {
            k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in answers(single, task).items()
        }
    gathered = read_jsonl(records)  # rank 0 wrote every rank's records, padding excluded
    assert {r.rank for r in gathered} == {0, 1}
    assert {(r.task, r.doc_id): r.output_token_ids for r in gathered} == single_records


@pytest.mark.slow
def test_a_failing_generation_fails_the_run(fixture_data, tmp_path):
    """lmms-eval's CLI exits 0 when generation raises; the harness CLI must not."""
    args = [
        *("-m", "globalcom2.lmms", "--model", MODEL_ID, "--model_args", "pretrained=tiny"),
        *("--tasks", "pope_adv_local", "--output_path", str(tmp_path / "out")),
        *(
            "--gen_kwargs",
            "max_new_tokens=3,repetition_penalty=-1.0",
        ),  # transformers refuses this in generate
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "evaluation failed" in done.stderr and "generation failed for pope_adv_local#" in done.stderr
    assert not list(Path(tmp_path / "out").rglob("*_results.json"))


@pytest.mark.slow
def test_plain_lmms_eval_exits_0_on_the_same_failure(fixture_data, tmp_path):
    """Why the harness CLI exists: lmms-eval itself reports success after a failed generation."""
    args = [
        *(
            "-m",
            "lmms_eval",
            "--model",
            MODEL_ID,
            "--model_args",
            "pretrained=tiny",
            "--include_path",
            str(REPO / "tasks"),
        ),
        *("--tasks", "pope_adv_local", "--output_path", str(tmp_path / "out")),
        *("--gen_kwargs", "max_new_tokens=3,repetition_penalty=-1.0"),
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0 and "generation failed for pope_adv_local#" in done.stdout + done.stderr
    assert not list(Path(tmp_path / "out").rglob("*_results.json"))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("globalcom2", {"retention_ratio": 0.25}),
        ("fastv", {"retention_ratio": 0.25}),
        ("sparsevlm", {"retention_ratio": 0.25}),
    ],
)
def test_every_method_gives_batch_invariant_answers_through_the_plugin(
    fixture_data, tmp_path, monkeypatch, method, params
):
    """The same check as above for the methods that score tokens (pre-LLM and in-LLM)."""
    monkeypatch.chdir(tmp_path)
    records = {}
    for batch_size in (1, 4):
        lm = GlobalCom2LlavaNext(pretrained="tiny", method=method, batch_size=batch_size, **params)
        api.evaluate(lm, ["globalcom2_demo"], limit=4, gen_kwargs="max_new_tokens=3")
        records[batch_size] = {r.doc_id: r for r in lm.records}
    assert records[1].keys() == records[4].keys() and len(records[1]) == 4
    for doc, record in records[1].items():
        assert record.output_token_ids == records[4][doc].output_token_ids, doc
        assert record.visual_tokens_after == records[4][doc].visual_tokens_after
        assert record.visual_tokens_after < record.visual_tokens_before
