"""The two protocols: ``llava`` feeds the model what LLaVA's own eval scripts fed it, ``lmms_eval`` keeps the
tasks' defaults. Expected prompts are written by hand from haotian-liu/LLaVA c121f043 (conversation.py
``conv_vicuna_v1``, model_vqa_loader/science/mmbench/model_vqa.py, the eval.zip question files), not from
our functions."""

from __future__ import annotations

import collections
import json

import pytest

from globalcom2.lmms import api
from globalcom2.lmms.show_inputs import main as show_inputs_main
from globalcom2.lmms.show_inputs import show_inputs
from globalcom2.protocol.batching import decode_answer
from globalcom2.protocol.rules import llava_pope_answer, task_protocol
from globalcom2.sample_records import summarize

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def turn(text: str) -> str:
    """conv_vicuna_v1.get_prompt() for one image: system, ' USER: ', '<image>\\n' + text, ' ASSISTANT:'."""
    return f"{SYSTEM} USER: <image>\n{text} ASSISTANT:"


# The first fixture row of every task, as LLaVA's pipeline would prompt it.
LLAVA_PROMPTS = {
    "vqav2_val_local": turn(f"What color is the square?\n{SHORT}"),
    "gqa_local": turn(f"Is it overcast?\n{SHORT}"),
    "vizwiz_vqa_val_local": turn(
        f"What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT}"
    ),
    "scienceqa_img_local": turn(
        f"Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma\n{LETTER}"
    ),
    "textvqa_val_local": turn(f"What brand is this?\nReference OCR token: nokia, 5800\n{SHORT}"),
    "pope_adv_local": turn(f"Is there a dining table in the image?\n{SHORT}"),
    "pope_pop_local": turn(f"Is there a person in the image?\n{SHORT}"),
    "pope_random_local": turn(f"Is there a dog in the image?\n{SHORT}"),
    "mme_local": turn(f"Is there a train in this image?\n{SHORT}"),
    "mmbench_en_dev_static_local": turn(
        "The image shows a scene.\nWhich category does this image belong to?\n"
        f"A. oil painting\nB. sketch\nC. digital art\nD. photo\n{LETTER}"
    ),
    "mmbench_cn_dev_static_local": turn(
        "图片展示了一个场景。\n这张图片属于哪一类？\nA. 油画\nB. 素描\nC. 数字艺术\nD. 照片\n请直接回答选项字母。"
    ),
    "mmvet_local": turn("What is the price of the sandwich?"),
    # the two EvalAI test splits: the same question files' text as val (LLaVA's test-dev and test files)
    "vqav2_testdev_local": turn(f"What color is the bus?\n{SHORT}"),
    "vizwiz_vqa_test_local": turn(
        f"What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT}"
    ),
}
PAPER_TASKS = list(LLAVA_PROMPTS)


@pytest.fixture(scope="module")
def llava_inputs(fixture_data):
    return {row["task"]: row for row in show_inputs(PAPER_TASKS, 1, "llava")}


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_llava_prompts_are_exactly_llavas(task, llava_inputs):
    row = llava_inputs[task]
    assert row["prompt"] == LLAVA_PROMPTS[task]
    budget = 1024 if task.startswith(("scienceqa", "mmbench", "mmvet")) else 128
    assert row["gen_kwargs"] == {"max_new_tokens": budget, "do_sample": False, "num_beams": 1, "until": []}
    assert len(row["visual_tokens"]) == len(row["grid"]) == len(row["image_sizes"]) == 1
    assert row["input_ids"][0] == 1 and len(row["input_ids"]) > row["visual_tokens"][0]


def test_scienceqa_context_line_only_when_there_is_a_hint(fixture_data):
    (row,) = [r for r in show_inputs(["scienceqa_img_local"], 2, "llava") if r["doc_id"] == 1]
    assert row["prompt"] == turn(
        "Context: Moles dig.\nWhich animal's feet are also adapted for digging?\nA. aardvark\nB. sugar glider\n"
        f"{LETTER}"
    )


def test_mmbench_stops_at_the_first_absent_option_and_skips_an_absent_hint():
    rule = task_protocol("llava", "mmbench_en_dev_static_local")
    doc = {"question": "Q?", "hint": "nan", "A": "x", "B": "y", "C": float("nan"), "D": "z"}
    assert rule.question(doc, "ignored") == f"Q?\nA. x\nB. y\n{LETTER}"
    # an empty cell is NaN where LLaVA reads the TSV (pd.read_table), so it ends the options there too
    doc = {"question": "Q?", "hint": "", "A": "x", "B": "y", "C": "", "D": ""}
    assert rule.question(doc, "ignored") == f"Q?\nA. x\nB. y\n{LETTER}"


@pytest.mark.parametrize("text", ["NA", "N/A", "null", "NULL", "#N/A", "<NA>", "None"])
def test_mmbench_reads_pandas_default_na_texts_as_absent_as_llavas_read_table_does(text):
    """LLaVA's ``pd.read_table`` turns these cells into NaN before its ``is_none`` sees them; pandas' own
    list is the one its readers use."""
    from pandas._libs.parsers import STR_NA_VALUES

    from globalcom2.protocol.rules import PANDAS_NA_TEXTS

    assert set(STR_NA_VALUES) == PANDAS_NA_TEXTS  # the installed pandas reads the same texts as NaN
    rule = task_protocol("llava", "mmbench_en_dev_static_local")
    doc = {"question": "Q?", "hint": text, "A": "x", "B": text, "C": "y", "D": float("nan")}
    assert rule.question(doc, "ignored") == f"Q?\nA. x\n{LETTER}"
    doc = {**doc, "hint": "na", "B": "Na"}  # pandas matches exactly: these are text
    assert rule.question(doc, "ignored") == f"na\nQ?\nA. x\nB. Na\nC. y\n{LETTER}"


def test_scienceqa_hint_is_stripped_as_llavas_question_file_was_built():
    rule = task_protocol("llava", "scienceqa_img_local")
    doc = {"question": "Q?", "hint": "  ", "choices": ["a", "b"]}
    assert rule.question(doc, "ignored") == f"Q?\nA. a\nB. b\n{LETTER}"
    doc = {**doc, "hint": " Moles dig.\n"}
    assert rule.question(doc, "ignored") == f"Context: Moles dig.\nQ?\nA. a\nB. b\n{LETTER}"


def test_the_lmms_eval_protocol_keeps_the_task_defaults(fixture_data):
    rows = {r["task"]: r for r in show_inputs(["mmbench_en_dev_static_local", "mmvet_local"], 1, "lmms_eval")}
    assert "There are several options:" in rows["mmbench_en_dev_static_local"]["prompt"]
    assert "think step by step" in rows["mmvet_local"]["prompt"]
    assert rows["mmvet_local"]["gen_kwargs"]["until"] == ["\n\n"]


@pytest.mark.parametrize(
    ("answer", "read"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("There is not a dog. No, wait.", "no"),  # the first sentence decides
        ("I think so", "yes"),
        ("NO", "yes"),  # eval_pope.py matches "No", "not", "no" only
        ("no, there isn't", "no"),
        ("Not really.", "yes"),  # "Not" is not in LLaVA's list either
        ("", "yes"),
    ],
)
def test_pope_answers_are_read_as_eval_pope_reads_them(answer, read):
    assert llava_pope_answer(answer) == read
    assert task_protocol("llava", "pope_adv_local").read_answer(answer) == read
    assert task_protocol("lmms_eval", "pope_adv_local").read_answer(answer) == answer


@pytest.mark.parametrize(
    ("task", "answer", "unread"),
    [
        ("pope_adv_local", "Yes, there is a dog in the image.", False),
        ("pope_adv_local", "yes", False),
        ("pope_adv_local", "No.", False),
        ("pope_adv_local", "There is not a dog.", False),
        ("pope_adv_local", "I think so", True),  # "yes" by default
        ("pope_adv_local", "NO", True),
        ("pope_adv_local", "", True),
        ("pope_adv_local", "A dog. Yes.", True),  # only the first sentence is read
        ("scienceqa_img_local", "B", False),
        ("scienceqa_img_local", "The answer is C.", False),
        ("scienceqa_img_local", "E", False),  # read (a letter), though past the choices: wrong, not unread
        ("scienceqa_img_local", "b", True),  # FAILED
        ("scienceqa_img_local", "", True),
        ("gqa_local", "", False),  # no reader of its own: nothing falls back
    ],
)
def test_an_answer_the_protocol_cannot_read_is_told_apart(task, answer, unread):
    """POPE's reader turns anything without a "no" into "yes", ScienceQA's into FAILED, as LLaVA's scripts
    do; compression pushes a model out of the answer format, so each such answer is counted, not hidden."""
    assert task_protocol("llava", task).unread(answer) is unread
    assert task_protocol("lmms_eval", task).unread(answer) is False


@pytest.mark.parametrize(
    ("answer", "llava_correct", "lmms_eval_correct"),
    [
        ("B", True, True),
        ("B. Paris", True, True),
        ("The answer is B.", True, False),  # LLaVA's third reading; lmms-eval has none
        ("b", False, True),  # lmms-eval ignores case, LLaVA does not
        ("B.", False, True),  # LLaVA wants "X. " with the space
        ("The answer is B. The answer is C.", False, False),  # two letters: FAILED
        ("E", False, False),  # past the question's choices (get_pred_idx gives -1)
        ("", False, False),
    ],
)
def test_scienceqa_answers_are_scored_as_eval_science_qa_scores_them(
    answer, llava_correct, lmms_eval_correct
):
    """Under ``llava`` the answer lmms-eval scores is the letter ``eval_science_qa.py`` reads (or FAILED), so
    lmms-eval's own scorer gives LLaVA's verdict; under ``lmms_eval`` its reading stands."""
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results

    doc = {"choices": ["London", "Paris", "Rome"], "answer": 1}
    for protocol, correct in (("llava", llava_correct), ("lmms_eval", lmms_eval_correct)):
        scored = task_protocol(protocol, "scienceqa_img_local").read_answer(answer)
        assert sqa_process_results(doc, [scored]) == {"exact_match": float(correct)}, protocol


def test_mmvet_under_llava_keeps_a_multi_paragraph_answer(processor):
    text = "First paragraph.\n\nSecond paragraph."
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    settings = task_protocol("llava", "mmvet_local").generation({"until": ["\n\n"]}, 1024)
    assert settings.until == () and settings.max_new_tokens == 1024
    assert decode_answer(processor.tokenizer, ids, {2}, settings.until).answer == text
    lmms = task_protocol("lmms_eval", "mmvet_local").generation({"until": ["\n\n"]}, 1024)
    assert decode_answer(processor.tokenizer, ids, {2}, lmms.until).answer == "First paragraph."


def test_llava_overrides_sample_iff_the_temperature_is_positive_as_llavas_scripts():
    """LLaVA's scripts sample iff ``--temperature > 0``: an override of the temperature samples (it was greedy
    under a fixed do_sample=false while the record said 0.7), and do_sample=true without one is refused."""
    protocol = task_protocol("llava", "gqa_local")
    assert protocol.generation({}, 1024).generate_kwargs() == {
        "max_new_tokens": 128, "do_sample": False, "num_beams": 1
    }  # fmt: skip
    sampled = protocol.generation({}, 1024, {"temperature": 0.7, "top_p": 0.9})
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.ignored) == (True, 0.7, 0.9, ())
    with pytest.raises(ValueError, match="do_sample=true needs temperature > 0"):
        protocol.generation({}, 1024, {"do_sample": True})


def test_llava_refuses_a_task_it_has_no_rule_for():
    with pytest.raises(ValueError, match="protocol='llava' has no rule for task 'mme'"):
        task_protocol("llava", "mme")
    with pytest.raises(ValueError, match="protocol='lava' is not a protocol; valid: lmms_eval, llava"):
        task_protocol("lava", "mme_local")
    assert task_protocol("llava", "globalcom2_demo").rule is None  # ours: one prompt for both


def test_show_inputs_prints_one_json_line_per_sample(fixture_data, capsys):
    assert (
        show_inputs_main(["--tasks", "pope_adv_local,mme_local", "--limit", "2", "--protocol", "llava"]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["task"], r["doc_id"]) for r in rows) == [
        ("mme_local", 0),
        ("mme_local", 1),
        ("pope_adv_local", 0),
        ("pope_adv_local", 1),
    ]
    keys = {"task", "doc_id", "prompt", "input_ids", "image_sizes", "grid", "visual_tokens", "gen_kwargs"}
    assert all(set(r) == keys for r in rows)
    for bad, message in [
        (["--generation-overrides", "{max_new_tokens: 8}"], "--generation-overrides is not JSON"),
        (["--protocol", "lmms_eval", "--generation-overrides", "{}"], "apply under --protocol llava only"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            show_inputs_main(["--tasks", "mme_local", "--protocol", "llava", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["llava", "lmms_eval"])
def test_both_protocols_run_all_ten_benchmarks_end_to_end(protocol, fixture_data, tmp_path):
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    lm = GlobalCom2LlavaNext(
        pretrained="tiny",
        method="random",
        retention_ratio=0.5,
        protocol=protocol,
        profile=False,
        **({"generation_overrides": {"max_new_tokens": 3}} if protocol == "llava" else {}),
    )
    results = api.evaluate(
        lm,
        PAPER_TASKS,
        output_path=tmp_path,
        limit=2,
        gen_kwargs=None if protocol == "llava" else "max_new_tokens=3",
    )
    assert set(PAPER_TASKS) <= set(results["results"])
    pope = results["samples"]["pope_adv_local"]
    answers = {sample["filtered_resps"][0] for sample in pope}
    if protocol == "llava":
        assert answers <= {"yes", "no"}  # read as eval_pope.py reads them
    records = {r.task for r in lm.records}
    assert records == set(PAPER_TASKS) and all(r.output_tokens <= 3 for r in lm.records)
    for record in lm.records:  # what was scored, and whether the protocol could read it, per answer
        reading = task_protocol(protocol, record.task)
        assert record.scored_answer == reading.read_answer(record.answer)
        assert record.unread_answer == reading.unread(record.answer)
    unread = collections.Counter(r.task for r in lm.records if r.unread_answer)
    assert summarize(lm.records)["unread_answers"] == dict(unread)
    if protocol == "lmms_eval":
        assert not unread  # lmms-eval's own parsers read those tasks


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--gen_kwargs", "max_new_tokens=2"], "--gen_kwargs='max_new_tokens=2'"),
        (["--system_instruction", "Be brief."], "--system_instruction='Be brief.'"),
        (["--num_fewshot", "2"], "--num_fewshot=2"),
    ],
)
def test_the_cli_refuses_options_that_llava_would_ignore(fixture_data, tmp_path, capsys, flags, named):
    from globalcom2.lmms import cli

    argv = ["--model", "globalcom2_llava_next", "--model_args", "pretrained=tiny,protocol=llava"]
    argv += ["--tasks", "mme_local", *flags, "--output_path", str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_PREFLIGHT
    assert f"{named} would be ignored under protocol=llava" in capsys.readouterr().err


def eval_config(*overrides: str):
    """The composed ``eval`` config with ``overrides``, as ``globalcom2.run`` would see it."""
    from helpers import CONFIGS
    from hydra import compose, initialize_config_dir

    import globalcom2.run  # noqa: F401  (registers the project_root resolver)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def test_a_cell_under_llava_passes_gen_kwargs_to_the_plugin_not_to_lmms_eval(tmp_path):
    from globalcom2.cells import CellSpec

    cfg = eval_config("benchmark=pope", "benchmark.protocol=llava", "benchmark.gen_kwargs='max_new_tokens=4'")
    spec = CellSpec.from_config(cfg)
    assert spec.benchmark.protocol == "llava"
    assert spec.benchmark.generation_overrides() == {"max_new_tokens": 4}
    assert spec.identity(cfg)["benchmark"]["protocol"] == "llava"
    bad = eval_config("benchmark=pope", "benchmark.protocol=lava")
    with pytest.raises(ValueError, match="protocol='lava' is not a protocol"):
        CellSpec.from_config(bad)


def test_llava_inputs_use_llavas_anyres_geometry(fixture_data, llava_inputs):
    """A small square image ties every grid: LLaVA splits it top/bottom (2 x 1), transformers left/right."""
    (lmms,) = show_inputs(["pope_adv_local"], 1, "lmms_eval")
    llava = llava_inputs["pope_adv_local"]
    assert llava["image_sizes"] == lmms["image_sizes"] == [[80, 80]]
    assert llava["grid"] == [[2, 1]] and lmms["grid"] == [[1, 2]]
    assert llava["visual_tokens"] == lmms["visual_tokens"] == [1176]


def test_llava_counts_the_in_llm_budget_in_patch_tokens(tmp_path):
    """The paper counts 2880 patch tokens, not the row separators: under ``llava`` FastV, SparseVLM and DivPrune
    get ``budget_basis="patches"`` in the plugin; a contradicting explicit basis is refused before any load."""
    from globalcom2.cells import CellSpec
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    llava = GlobalCom2LlavaNext(
        pretrained="tiny", method="fastv", retention_ratio=0.5, protocol="llava", profile=False
    )
    assert llava.method.budget_basis == "patches"
    assert llava.run_info["method_params"]["budget_basis"] == "patches"
    lmms = GlobalCom2LlavaNext(pretrained="tiny", method="sparsevlm", retention_ratio=0.5, profile=False)
    assert lmms.method.budget_basis == "positions"
    pre_llm = GlobalCom2LlavaNext(
        pretrained="tiny", method="random", retention_ratio=0.5, protocol="llava", profile=False
    )
    assert "budget_basis" not in pre_llm.method.params(), "pre-LLM methods always count patches"
    divprune = GlobalCom2LlavaNext(
        pretrained="tiny", method="divprune", retention_ratio=0.5, protocol="llava", profile=False
    )
    assert divprune.method.budget_basis == "patches", "a pre-LLM method with a basis gets the paper's"

    with pytest.raises(ValueError, match="budget_basis='positions' contradicts protocol=llava"):
        GlobalCom2LlavaNext(
            pretrained="tiny", method="fastv", retention_ratio=0.5, protocol="llava", budget_basis="positions"
        )
    cfg = eval_config(
        "benchmark=pope", "benchmark.protocol=llava", "method=fastv", "+method.params.budget_basis=positions"
    )
    with pytest.raises(ValueError, match="contradicts protocol=llava"):
        CellSpec.from_config(cfg)
    implicit = CellSpec.from_config(eval_config("benchmark=pope", "benchmark.protocol=llava", "method=fastv"))
    explicit = CellSpec.from_config(
        eval_config(
            "benchmark=pope",
            "benchmark.protocol=llava",
            "method=fastv",
            "+method.params.budget_basis=patches",
        )
    )
    assert implicit.method.params == explicit.method.params == {"K": 2, "budget_basis": "patches"}


def test_the_python_api_refuses_what_the_cli_refuses_under_llava(fixture_data, tmp_path, monkeypatch):
    """``api.evaluate`` makes the CLI's checks: ``gen_kwargs`` would be ignored under ``llava``, and a task
    ``llava`` has no rule for would fail only after the model and tasks had loaded."""
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext
    from globalcom2.lmms.preflight import PreflightError

    monkeypatch.chdir(tmp_path)
    lm = GlobalCom2LlavaNext(pretrained="tiny", method="vanilla", protocol="llava")
    with pytest.raises(
        PreflightError, match="gen_kwargs='max_new_tokens=3' would be ignored under protocol=llava"
    ):
        api.evaluate(lm, ["pope_adv_local"], limit=1, gen_kwargs="max_new_tokens=3")
    with pytest.raises(PreflightError, match=r"system_instruction='Be brief\.' would be ignored"):
        api.evaluate(lm, ["pope_adv_local"], limit=1, system_instruction="Be brief.")
    with pytest.raises(PreflightError, match="protocol='llava' has no rule for task 'mme'"):
        api.evaluate(lm, ["mme"], limit=1)
    assert not lm.records  # nothing ran
