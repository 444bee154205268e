"""What the model is fed, benchmark by benchmark: the paper's LLaVA protocol, or lmms-eval's task defaults.

``protocol`` (a plugin ``model_args`` key and ``benchmark.protocol`` in Hydra) takes two values:

* ``llava`` reproduces the original LLaVA v1.6 evaluation that the GlobalCom² paper used
  (haotian-liu/LLaVA at c121f0432da27facab705978f83c4ada465e46fd, ``scripts/v1_5/eval/*.sh`` with
  ``--temperature 0 --conv-mode vicuna_v1``; xuyang-liu16/GlobalCom2 ships the same scripts):
  * the prompt is the question-file text after ``<image>\\n`` (:data:`LLAVA_RULES`, one rule per task);
  * decoding is greedy, one beam, no stop string (EOS only), with ``max_new_tokens`` 128 for the tasks
    of ``llava/eval/model_vqa_loader.py`` (its argparse default, L141) and 1024 for ScienceQA, MMBench
    and MM-Vet (hard-coded in ``model_vqa_science.py`` L80, ``model_vqa_mmbench.py`` L120 and
    ``model_vqa.py`` L71);
  * POPE and ScienceQA answers are read as LLaVA's ``llava/eval/eval_pope.py`` (L10-20) and
    ``llava/eval/eval_science_qa.py`` (L65-75) read them, before lmms-eval scores them
    (:func:`llava_pope_answer`, :func:`llava_scienceqa_answer`);
  * the AnyRes geometry is LLaVA's (grid ties, unpadding: ``globalcom2.models.geometry``);
  * scoring is otherwise lmms-eval's, with GQA's paper column scored as LLaVA scores it under both protocols
    (``llava_exact_match``, ``globalcom2.lmms.task_utils``: ``scripts/convert_gqa_for_eval.py`` L14 strips
    a trailing ``.`` and lower-cases, where lmms-eval's ``exact_match`` beside it also ignores punctuation
    inside an answer), and one known deviation: lmms-lab's POPE random split holds 3,000 questions where LLaVA's
    ``llava_pope_test.jsonl`` holds 2,910. The 90 are known: RUCAIBox/POPE's ``coco_pope_random.json`` at
    e3e3926 holds LLaVA's 2,910, and edebdda ("Fix spelling errors") adds 90 questions, all answered "no"
    (and fixes "imange" in 144). They stay in: telling them apart in lmms-lab's rows needs its image ids,
    which could not be checked without the data.
* ``lmms_eval`` keeps lmms-eval's own task defaults (its prompts, ``generation_kwargs`` and ``until``),
  for comparison with lmms-eval-based papers and leaderboards.

Both protocols use the ``vicuna_v1`` conversation (``globalcom2.prompts``). Our own generated tasks (the
demo and efficiency benchmarks) have one prompt only, which both protocols use.

Question-file suffixes are not in the LLaVA repository (they ship in its ``eval.zip``). They are taken
from a copy of that archive committed in the LLaVA mirror (32cebc38, an ancestor of the head of
``refs/pull/1199``, a third-party PR), checked line by line for GQA, VizWiz, TextVQA, POPE, MME, MM-Vet and ScienceQA; VQAv2's
file is missing there, and its suffix follows ``docs/Evaluation.md`` L13-18 (short-answer format), the
same one the other short-answer files carry (high confidence, not checked byte for byte). MMBench's
prompt is built in code (``model_vqa_mmbench.py`` L81-99), so it is certain.

LLaVA tokenises the text before and after ``<image>`` separately (``tokenizer_image_token``, ``llava/mm_utils.py``
L185-204); under ``llava`` so do we (``globalcom2.protocol.tokenization``). Under ``llava`` the in-LLM
methods count their budget in patch tokens, as the paper does (:func:`budget_method_params`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from globalcom2.methods.params import method_parameters
from globalcom2.protocol.generation import GenerationSettings

PROTOCOLS = ("lmms_eval", "llava")
DEFAULT_PROTOCOL = "lmms_eval"

SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"
MME_SUFFIX = " Please answer yes or no."
#: ``model_vqa_loader.py``'s default ``--max_new_tokens`` (L141); the eval scripts do not set it.
LOADER_MAX_NEW_TOKENS = 128
#: Hard-coded in ``model_vqa_science.py`` (L80), ``model_vqa_mmbench.py`` (L120) and ``model_vqa.py`` (L71).
LONG_MAX_NEW_TOKENS = 1024


def geometry_of(protocol: str) -> str:
    """The AnyRes geometry a protocol evaluates with (``globalcom2.models.geometry``): LLaVA's grid ties and
    unpadding under ``llava``, transformers' under ``lmms_eval``."""
    return "llava" if check_protocol(protocol) == "llava" else "transformers"


def budget_method_params(protocol: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` of ``method`` with the budget basis the protocol counts in.

    Under ``llava`` the retention ratio is a fraction of the patch tokens, the "2880" of the GlobalCom²
    paper ("retain up to 2880·R tokens": 2880 = 5 x 576 patch tokens, while a 672x672 image has 2928 visual
    positions with its 48 row separators), so every method with a ``budget_basis`` parameter (the in-LLM methods
    and DivPrune) gets ``budget_basis="patches"`` and keeps every separator, as GlobalCom² and ``random`` always
    do. Under ``lmms_eval`` the method's own ``budget_basis`` (default ``"positions"``) stands.

    Raises:
        ValueError: ``params`` asks ``llava`` for another basis.
    """
    params = dict(params)
    if check_protocol(protocol) != "llava" or "budget_basis" not in method_parameters(method):
        return params
    basis = params.setdefault("budget_basis", "patches")
    if basis != "patches":
        raise ValueError(
            f"budget_basis={basis!r} contradicts protocol=llava, which counts the budget in patch tokens as "
            "the paper does; drop budget_basis or use protocol=lmms_eval"
        )
    return params


def check_protocol(protocol: Any) -> str:
    """``protocol`` if it is one we define, else ``ValueError`` naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not a protocol; valid: {', '.join(PROTOCOLS)}")
    return protocol


def short_answer(doc: Mapping[str, Any]) -> str:
    """VQAv2, GQA and POPE: ``llava_vqav2_mscoco_test-dev2015.jsonl``, ``llava_gqa_testdev_balanced.jsonl``,
    ``llava_pope_test.jsonl``: the question as written, then the short-answer instruction."""
    return f"{doc['question']}\n{SHORT_ANSWER}"


def vizwiz(doc: Mapping[str, Any]) -> str:
    """``vizwiz/llava_test.jsonl``: the question capitalised, then two instruction lines.

    All 8000 questions of LLaVA's file equal their ``str.capitalize()`` ("How long and what temperature do
    i bake this pizza for?"), so the file was written from capitalised questions, as lmms-eval does.
    """
    return f"{doc['question'].capitalize()}\n{UNANSWERABLE}\n{SHORT_ANSWER}"


def textvqa(doc: Mapping[str, Any]) -> str:
    """``textvqa/llava_textvqa_val_v051_ocr.jsonl``: the question capitalised, the Rosetta OCR tokens, the
    instruction.

    Every one of its 5000 rows carries the OCR line (lmms-eval's ``textvqa_val`` has ``ocr: false``), and
    every question equals its ``str.capitalize()`` ("Where will i be if i turn right?"). This is what the eval
    scripts the paper cites send (``scripts/v1_5/eval/textvqa.sh`` with ``model_vqa_loader.py``). The
    paper's vanilla TextVQA (64.9 for 7B) is LLaVA's model-zoo number, which users reproduce only *without*
    this line (haotian-liu/LLaVA#1326: 61.35-61.4 with it, 64.7-64.9 with the loader keeping lines 0, 1 and 3
    of the prompt), and xuyang-liu16/GlobalCom2's ``model_vqa_loader.py`` drops it in a commit after the
    paper's first version. So the published TextVQA rows may mix the two prompts; the column is marked not
    comparable (``globalcom2.data.benchmarks.PAPER_METRICS``), and our own vanilla row is the baseline.
    """
    tokens = ", ".join(doc["ocr_tokens"] or [])
    return f"{doc['question'].capitalize()}\nReference OCR token: {tokens}\n{SHORT_ANSWER}"


def mme(doc: Mapping[str, Any]) -> str:
    """``MME/llava_mme.jsonl``: MME's own " Please answer yes or no." replaced by the short-answer line."""
    question = doc["question"].replace(MME_SUFFIX, "").strip()
    return f"{question}\n{SHORT_ANSWER}"


def scienceqa(doc: Mapping[str, Any]) -> str:
    """``scienceqa/llava_test_CQM-A.json`` + ``--single-pred-prompt`` (``model_vqa_science.py`` L43-64):
    ``Context: <hint>`` (only when there is one), the question, ``A. …`` lines, the letter instruction.

    The hint is stripped first, as the file's builder does (ScienceQA's ``get_context_text``, which LLaVA's
    ``scripts/convert_sqa_to_llava_base_prompt.py`` copies: ``" ".join([hint, caption]).strip()``), so a
    hint of only whitespace is no hint."""
    hint = (doc.get("hint") or "").strip()
    lines = [f"Context: {hint}"] if hint else []
    lines.append(doc["question"])
    lines += [f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(doc["choices"])]
    return "\n".join([*lines, OPTION_LETTER])


#: The cell texts ``pd.read_table`` reads as NaN by default (pandas' documented ``na_values`` default, the
#: same in pandas 2.x), matched exactly as pandas matches them.
PANDAS_NA_TEXTS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
     "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip


def _is_none(value: Any) -> bool:
    """``model_vqa_mmbench.py``'s ``is_none`` (L33-42: None, NaN, "nan" and "none" in any case) after its
    ``pd.read_table`` (L61), which has already turned every default NA text (:data:`PANDAS_NA_TEXTS`: an
    empty cell, "NA", "N/A", "null" …) into NaN: each counts as absent, so such an option ends the list and
    such a hint is dropped, as in LLaVA."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and (value in PANDAS_NA_TEXTS or value.lower() in ("nan", "none"))


def _mmbench(instruction: str) -> Callable[[Mapping[str, Any]], str]:
    def build(doc: Mapping[str, Any]) -> str:
        """``model_vqa_mmbench.py`` L81-99: ``hint\\nquestion`` (the hint only when present), then one
        ``X. option`` line for A-D up to the first absent option, then the instruction (``--single-pred-prompt``).
        No ``--all-rounds``: the dev file already holds the circular copies."""
        question = doc["question"] if _is_none(doc.get("hint")) else f"{doc['hint']}\n{doc['question']}"
        for letter in "ABCD":
            if _is_none(doc.get(letter)):
                break
            question += f"\n{letter}. {doc[letter]}"
        return f"{question}\n{instruction}"

    return build


def mmvet(doc: Mapping[str, Any]) -> str:
    """``mm-vet/llava-mm-vet.jsonl``: the bare question (lmms-eval prepends a "think step by step" line)."""
    return doc["question"]


def _pope_words(text: str) -> set[str]:
    """``eval_pope.py`` L10-16: the words of the first sentence, commas removed, split on spaces."""
    if "." in text:
        text = text.split(".")[0]
    return set(text.replace(",", "").split(" "))


def llava_pope_answer(text: str) -> str:
    """``eval_pope.py`` L10-20: "No", "not" or "no" among the first sentence's words means "no", anything
    else (an empty answer too) means "yes"."""
    return "no" if {"No", "not", "no"} & _pope_words(text) else "yes"


def llava_pope_unread(text: str) -> bool:
    """Whether ``eval_pope.py`` read ``text`` as "yes" by default: its first sentence says neither "no" (its
    three words) nor "yes"/"Yes" ("NO", "I think so", an empty answer)."""
    return not {"No", "not", "no", "Yes", "yes"} & _pope_words(text)


#: ``eval_science_qa.py``'s ``--options`` (L15): the letters a ScienceQA answer may name.
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")


def llava_scienceqa_answer(text: str) -> str:
    """``eval_science_qa.py`` L65-75: the answer is the letter itself, ``X. …`` (a letter, a dot and a space),
    or the one letter of ``The answer is X.``; anything else is ``FAILED``, scored wrong (L77, L91).

    lmms-eval's own reading (``sqa_process_results``) differs: it takes ``b`` or ``B.``, which LLaVA fails,
    and fails ``The answer is B.``, which LLaVA takes. Returning the letter LLaVA reads (or ``FAILED``) makes
    lmms-eval's scorer give LLaVA's verdict: a letter past the question's choices is wrong under both
    (``get_pred_idx`` L28-35 returns -1)."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else SCIENCEQA_FAILED


#: What :func:`llava_scienceqa_answer` returns for an answer it cannot read (``eval_science_qa.py`` L75).
SCIENCEQA_FAILED = "FAILED"


def llava_scienceqa_unread(text: str) -> bool:
    """Whether ``eval_science_qa.py`` could not read a letter from ``text`` (``FAILED``, scored wrong)."""
    return llava_scienceqa_answer(text) == SCIENCEQA_FAILED


@dataclass(frozen=True)
class LlavaRule:
    """How LLaVA's scripts feed and read one task.

    Attributes:
        question: the question-file text (what follows ``<image>\\n`` in the user turn), from a document.
        max_new_tokens: the generation budget of the LLaVA module that runs the benchmark.
        read_answer: LLaVA's post-processing before scoring, if any.
        unread: whether ``read_answer`` found nothing it could read in an answer and fell back to a default
            (counted per cell: compression is what pushes a model out of the answer format).
    """

    question: Callable[[Mapping[str, Any]], str]
    max_new_tokens: int
    read_answer: Callable[[str], str] | None = None
    unread: Callable[[str], bool] | None = None


LLAVA_RULES: dict[str, LlavaRule] = {
    "vqav2_val_local": LlavaRule(short_answer, LOADER_MAX_NEW_TOKENS),
    "vqav2_testdev_local": LlavaRule(short_answer, LOADER_MAX_NEW_TOKENS),
    "gqa_local": LlavaRule(short_answer, LOADER_MAX_NEW_TOKENS),
    "vizwiz_vqa_val_local": LlavaRule(vizwiz, LOADER_MAX_NEW_TOKENS),
    "vizwiz_vqa_test_local": LlavaRule(vizwiz, LOADER_MAX_NEW_TOKENS),
    "scienceqa_img_local": LlavaRule(
        scienceqa, LONG_MAX_NEW_TOKENS, llava_scienceqa_answer, llava_scienceqa_unread
    ),
    "textvqa_val_local": LlavaRule(textvqa, LOADER_MAX_NEW_TOKENS),
    "pope_adv_local": LlavaRule(short_answer, LOADER_MAX_NEW_TOKENS, llava_pope_answer, llava_pope_unread),
    "pope_pop_local": LlavaRule(short_answer, LOADER_MAX_NEW_TOKENS, llava_pope_answer, llava_pope_unread),
    "pope_random_local": LlavaRule(short_answer, LOADER_MAX_NEW_TOKENS, llava_pope_answer, llava_pope_unread),
    "mme_local": LlavaRule(mme, LOADER_MAX_NEW_TOKENS),
    "mmbench_en_dev_static_local": LlavaRule(_mmbench(OPTION_LETTER), LONG_MAX_NEW_TOKENS),
    "mmbench_cn_dev_static_local": LlavaRule(_mmbench(OPTION_LETTER_CN), LONG_MAX_NEW_TOKENS),
    "mmvet_local": LlavaRule(mmvet, LONG_MAX_NEW_TOKENS),
}


@dataclass(frozen=True)
class TaskProtocol:
    """How one task is fed and read under one protocol (what the plugin and ``show_inputs`` use)."""

    protocol: str
    rule: LlavaRule | None  # None: the task's own prompt and generation settings

    def question(self, doc: Mapping[str, Any], context: str) -> str:
        """The user text after the images: the LLaVA question-file text, or lmms-eval's context."""
        return context if self.rule is None else self.rule.question(doc)

    def generation(
        self,
        task_gen_kwargs: dict[str, Any] | None,
        default_max_new_tokens: int,
        overrides: Mapping[str, Any] | None = None,
    ) -> GenerationSettings:
        """lmms-eval's request settings, or LLaVA's (temperature 0: greedy, one beam, EOS only) with the task's
        budget.

        ``overrides`` (``generation_overrides``) apply on top under ``llava``, e.g. a smaller
        ``max_new_tokens`` for a smoke test; they are part of the cell's identity and of its records.
        """
        if self.rule is None:  # the task's own settings (overrides only exist under llava: our demo tasks)
            merged = {**(task_gen_kwargs or {}), **(overrides or {})}
            return GenerationSettings.from_gen_kwargs(merged, default_max_new_tokens)
        # LLaVA's scripts pass --temperature 0 and sample iff temperature > 0 (model_vqa_loader.py): an
        # override of the temperature samples as they would, and do_sample=true without one is refused
        kwargs = {"max_new_tokens": self.rule.max_new_tokens, "temperature": 0, "num_beams": 1, "until": []}
        return GenerationSettings.from_gen_kwargs({**kwargs, **(overrides or {})}, default_max_new_tokens)

    def read_answer(self, answer: str) -> str:
        """The text lmms-eval scores (LLaVA's post-processing under ``llava``)."""
        if self.rule is None or self.rule.read_answer is None:
            return answer
        return self.rule.read_answer(answer)

    def unread(self, answer: str) -> bool:
        """Whether :meth:`read_answer` fell back to a default for ``answer`` (POPE's "yes", ScienceQA's
        ``FAILED``); ``False`` where the protocol reads nothing itself (lmms-eval's own parsers then)."""
        return self.rule is not None and self.rule.unread is not None and self.rule.unread(answer)


def task_protocol(protocol: str, task: str) -> TaskProtocol:
    """The protocol of ``task``; ``ValueError`` for a task ``llava`` has no rule for (our generated tasks
    have only one prompt and are fine under either)."""
    from globalcom2.data.benchmarks import GENERATED_TASKS

    check_protocol(protocol)
    if protocol == "lmms_eval" or task in GENERATED_TASKS:
        return TaskProtocol(protocol, None)
    if task not in LLAVA_RULES:
        raise ValueError(
            f"protocol='llava' has no rule for task {task!r} (LLaVA's scripts cover the offline paper tasks: "
            f"{', '.join(LLAVA_RULES)}); use protocol='lmms_eval' for it"
        )
    return TaskProtocol(protocol, LLAVA_RULES[task])


def check_tasks_covered(protocol: str, tasks: Sequence[str]) -> None:
    """``ValueError`` listing every task ``protocol`` has no rule for (see :func:`task_protocol`)."""
    problems = []
    for task in tasks:
        try:
            task_protocol(protocol, task)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
