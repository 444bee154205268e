"""The plugin's answers journal (``answers_journal``): a run interrupted mid-way and run again answers every
request as an uninterrupted run does, generating only what the interrupted run had not finished."""

from __future__ import annotations

import pytest
from test_plugin import requests_for

from globalcom2.answer_journal import SETTINGS_FILE, rank_file
from globalcom2.lmms.plugin import GlobalCom2LlavaNext

SIZES = [(336, 1008), (336, 336), (800, 600), (336, 336), (1008, 336), (672, 672), (336, 1008)]
GEN = {"until": ["\n\n"], "max_new_tokens": 3}


class Interrupted(Exception):
    """Stands for the kill: raised by ``generate`` once the run has answered some batches."""


def plugin(journal, batch_size=3, prefetch=True, **method):
    method = method or {"method": "random", "retention_ratio": 0.25}
    return GlobalCom2LlavaNext(
        pretrained="tiny", **method, profile=False, batch_size=batch_size, prefetch=prefetch,
        answers_journal=str(journal),
    )  # fmt: skip


def counting_generate(lm, monkeypatch, fail_on_call=None):
    """Count ``generate`` calls; raise :class:`Interrupted` on call number ``fail_on_call``."""
    calls = []
    real = lm.model.generate

    def generate(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == fail_on_call:
            raise Interrupted
        return real(**kwargs)

    monkeypatch.setattr(lm.model, "generate", generate)
    return calls


def lines(journal):
    return rank_file(journal, 0).read_text().splitlines()


@pytest.mark.parametrize("prefetch", [False, True])
def test_an_interrupted_run_resumes_with_the_answers_of_an_uninterrupted_one(
    tmp_path, images, monkeypatch, prefetch
):
    docs = [{"image": images[size]} for size in SIZES]
    whole = plugin(tmp_path / "whole", prefetch=prefetch)
    expected = [o.text for o in whole.generate_until(requests_for(whole, docs, gen_kwargs=GEN))]
    expected_records = list(whole.records)
    assert len(lines(tmp_path / "whole")) == 3  # batches of 3, 3 and 1

    first = plugin(tmp_path / "cut", prefetch=prefetch)
    counting_generate(first, monkeypatch, fail_on_call=2)
    with pytest.raises(RuntimeError, match="generation failed") as failure:
        first.generate_until(requests_for(first, docs, gen_kwargs=GEN))
    assert isinstance(failure.value.__cause__, Interrupted)
    assert len(lines(tmp_path / "cut")) == 1  # the batch finished before the kill, and only it

    resumed = plugin(tmp_path / "cut", prefetch=prefetch)
    calls = counting_generate(resumed, monkeypatch)
    outputs = resumed.generate_until(requests_for(resumed, docs, gen_kwargs=GEN))
    assert [o.text for o in outputs] == expected
    assert sorted(calls) == [1, 3]  # only the two batches the interrupted run had not finished
    records = resumed.records
    assert [r.doc_id for r in records] == list(range(len(docs)))
    assert sum(r.replayed for r in records) == 3 and resumed.records_summary()["replayed"] == 3
    for got, want in zip(records, expected_records, strict=True):
        assert got.output_token_ids == want.output_token_ids
        assert (got.batch_size, got.visual_tokens_after) == (want.batch_size, want.visual_tokens_after)
    # the resumed run's calls are numbered after the interrupted run's: a (rank, batch id) is one call
    assert {r.batch_id for r in records if r.replayed} == {0}
    assert {r.batch_id for r in records if not r.replayed} == {1, 2}
    assert resumed.records_summary()["generate_calls"] == 3
    assert len(lines(tmp_path / "cut")) == 3


def test_a_finished_journal_answers_everything_without_reading_a_document(tmp_path, images, monkeypatch):
    docs = [{"image": images[size]} for size in SIZES]
    lm = plugin(tmp_path)
    expected = [o.text for o in lm.generate_until(requests_for(lm, docs, gen_kwargs=GEN))]
    again = plugin(tmp_path)
    calls = counting_generate(again, monkeypatch)
    requests = requests_for(again, docs, gen_kwargs=GEN)

    def unreadable(doc):
        raise AssertionError("a journaled window was read")

    for request in requests:
        request.arguments = (*request.args[:2], unreadable, *request.args[3:])
    assert [o.text for o in again.generate_until(requests)] == expected and calls == []
    assert all(r.replayed for r in again.records)


def test_a_changed_prompt_is_answered_again(tmp_path, images, monkeypatch):
    docs = [{"image": images[(336, 336)]}, {"image": images[(672, 672)]}]
    lm = plugin(tmp_path, batch_size=1)
    lm.generate_until(requests_for(lm, docs, gen_kwargs=GEN))
    again = plugin(tmp_path, batch_size=1)
    calls = counting_generate(again, monkeypatch)
    again.generate_until(requests_for(again, docs, context="Is there a dog?", gen_kwargs=GEN))
    assert calls == [1, 1] and not any(r.replayed for r in again.records)


def test_a_journal_of_other_settings_is_refused_before_anything_runs(tmp_path):
    plugin(tmp_path, batch_size=3)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 3 -> 2\)"):
        plugin(tmp_path, batch_size=2)
    with pytest.raises(ValueError, match=r"method_params: .*0\.25.* -> .*0\.5"):
        plugin(tmp_path, batch_size=3, method="random", retention_ratio=0.5)
    assert (tmp_path / SETTINGS_FILE).is_file()


def test_a_call_that_samples_anywhere_is_neither_journaled_nor_replayed(tmp_path, images, monkeypatch):
    """A sampled answer depends on the random state that everything generated before it moved (a warm-up,
    greedy batches included), so a resumed call would draw another stream: it is generated whole."""
    docs = [{"image": images[(336, 336)]}, {"image": images[(672, 672)]}]
    lm = plugin(tmp_path, batch_size=1)
    lm.generate_until(requests_for(lm, docs, gen_kwargs=GEN))
    assert len(lines(tmp_path)) == 2
    again = plugin(tmp_path, batch_size=1)
    calls = counting_generate(again, monkeypatch)
    sampled = {**GEN, "do_sample": True, "temperature": 0.7}
    mixed = requests_for(again, docs, gen_kwargs=GEN) + requests_for(again, docs, gen_kwargs=sampled)[:1]
    again.generate_until(mixed)
    assert calls == [1, 1, 1] and not any(r.replayed for r in again.records)  # the greedy two as well
    assert len(lines(tmp_path)) == 2  # and nothing of it journaled


def test_a_resume_across_windows_replays_only_the_batches_finished(tmp_path, images, monkeypatch):
    """18 requests in batches of 2: a first window of 8 batches and a second of one. Cut after 5 batches,
    the resumed run generates the first window's last 3 and the second window's one, and nothing else."""
    sizes = [(336, 1008), (336, 336), (800, 600), (672, 672), (1008, 336), (336, 336)] * 3
    docs = [{"image": images[size]} for size in sizes]
    whole = plugin(tmp_path / "whole", batch_size=2)
    expected = [o.output_token_ids for o in whole_records(whole, docs)]
    first = plugin(tmp_path / "cut", batch_size=2)
    counting_generate(first, monkeypatch, fail_on_call=6)
    with pytest.raises(RuntimeError, match="generation failed"):
        first.generate_until(requests_for(first, docs, gen_kwargs=GEN))
    resumed = plugin(tmp_path / "cut", batch_size=2)
    calls = counting_generate(resumed, monkeypatch)
    assert [r.output_token_ids for r in whole_records(resumed, docs)] == expected
    assert calls == [2, 2, 2, 2] and sum(r.replayed for r in resumed.records) == 10


def whole_records(lm, docs):
    lm.reset_records()
    lm.generate_until(requests_for(lm, docs, gen_kwargs=GEN))
    return lm.records


def test_a_cell_s_journal_of_other_settings_is_emptied_and_generated_again(tmp_path, images, monkeypatch):
    docs = [{"image": images[(336, 336)]}]
    lm = plugin(tmp_path, batch_size=1)
    lm.generate_until(requests_for(lm, docs, gen_kwargs=GEN))
    import globalcom2.lmms.plugin as plugin_module

    monkeypatch.setattr(plugin_module, "code_digest", lambda: "edited since")
    again = GlobalCom2LlavaNext(
        pretrained="tiny", method="random", retention_ratio=0.25, profile=False, answers_journal=str(tmp_path),
        discard_stale_answers=True,
    )  # fmt: skip
    assert "other settings (code:" in again.journal.discarded
    calls = counting_generate(again, monkeypatch)
    again.generate_until(requests_for(again, docs, gen_kwargs=GEN))
    assert calls == [1] and len(lines(tmp_path)) == 1
