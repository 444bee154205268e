"""The results store never serves a stale cell: a cell's identity is everything that can change its result,
and whoever holds a cell's lock decides whether it runs. In process, through ``globalcom2.run.run``."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, cached_hub_dataset, compose_eval, fake_hub_repo, synthetic_image
from safetensors.torch import load_file, save_file

import globalcom2
import globalcom2.cells as cells_module
import globalcom2.run as run_module
from globalcom2.cells import CellSpec
from globalcom2.models.tiny import tiny_checkpoint
from globalcom2.paths import TASKS_DIR_ENV
from globalcom2.store import Cell, current_cell_id

FAST = ["model=tiny", "benchmark=demo", "benchmark.gen_kwargs='max_new_tokens=2'", "method=random"]


def compose_cell(tmp_path: Path, *overrides: str):
    return compose_eval(tmp_path, *FAST, *overrides)


def cell_identity(tmp_path: Path, *overrides: str) -> dict:
    """The identity of the cell a config with ``overrides`` describes (nothing is run)."""
    cfg = compose_cell(tmp_path, *overrides)
    return CellSpec.from_config(cfg).identity(cfg)


def run_cell(tmp_path: Path, monkeypatch, capsys, *overrides: str) -> tuple[dict | None, str]:
    """One ``globalcom2.run`` invocation (a fresh process would start with an empty sweep memory); returns
    the cell's ``record.json`` as written (``None`` for a dry run) and what it printed."""
    monkeypatch.setattr(run_module, "_SEEN_THIS_SWEEP", set())
    capsys.readouterr()
    record = run_module.run(compose_cell(tmp_path, *overrides))
    if record is not None:
        record = json.loads((Path(record.cell.path) / "record.json").read_text())
    return record, capsys.readouterr().out


def test_a_changed_limit_seed_or_method_parameter_runs_a_new_cell(tmp_path, monkeypatch, capsys):
    base, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=2")
    assert "[run]" in out and "not run yet" in out
    from accelerate.state import AcceleratorState, PartialState

    # the cell's Accelerator state is forgotten, so a next cell of this process may take another device
    assert not AcceleratorState._shared_state and not PartialState._shared_state
    config = (Path(base["cell"]["path"]) / "config.yaml").read_text()
    assert config.startswith("# The config as this job composed it (the request). What ran is record.json's")
    changes = {
        "benchmark.limit=3": ("benchmark.limit: 2 -> 3", lambda r: r["spec"]["benchmark"]["limit"] == 3),
        "seed=1": ("seed: 0 -> 1", lambda r: r["spec"]["seed"] == 1 and r["run"]["seed"] == 1),
        "method.params.seed=1": (
            "method.params.seed: 0 -> 1",
            lambda r: r["run"]["method_params"]["seed"] == 1,
        ),
    }
    ids = {base["cell"]["id"]}
    for override, (reason, holds) in changes.items():
        extra = [] if override.startswith("benchmark.limit") else ["benchmark.limit=2"]
        record, out = run_cell(tmp_path, monkeypatch, capsys, override, *extra)
        assert "[run]" in out and "[done]" not in out, out
        assert reason in out, out  # the user sees why it ran
        assert holds(record) and record["cell"]["id"] not in ids
        ids.add(record["cell"]["id"])
    assert len(list((tmp_path / "results").rglob("record.json"))) == 4

    # Back to the first settings: that cell is reused, untouched, and becomes the one the tables show.
    again, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=2")
    assert "[done]" in out and "same settings" in out and "[run]" not in out
    assert again == base
    assert current_cell_id(Path(base["cell"]["path"]).parent) == base["cell"]["id"]


def test_other_weights_under_the_same_checkpoint_name_run_a_new_cell(tmp_path, monkeypatch, capsys):
    """A checkpoint folder retrained or replaced in place (a ``git pull`` of ``tiny-trained``) is not served
    the cells of its old weights: the weights' content is part of the identity."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint(0), folder)
    first, _ = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", f"model.pretrained={folder}")
    again, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", f"model.pretrained={folder}")
    assert "[done]" in out and again == first
    state = load_file(folder / "model.safetensors")
    name = sorted(state)[0]
    state[name] = state[name] + 1.0
    (folder / "model.safetensors").unlink()  # as git or a trainer replaces the file
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    retrained, out = run_cell(
        tmp_path, monkeypatch, capsys, "benchmark.limit=1", f"model.pretrained={folder}"
    )
    assert "[run]" in out and "[done]" not in out, out
    assert "weights.files.model.safetensors: " in out, out  # the user sees why it ran
    assert retrained["cell"]["id"] != first["cell"]["id"]
    assert current_cell_id(Path(first["cell"]["path"]).parent) == retrained["cell"]["id"]


def test_a_cell_whose_weights_cannot_be_named_is_never_run_or_stored(tmp_path, monkeypatch, capsys):
    unresolved = {"unresolved": "tiny", "reason": "ConnectionError: no route to host"}
    monkeypatch.setattr(cells_module, "checkpoint_identity", lambda pretrained, **kwargs: unresolved)
    with pytest.raises(
        run_module.CellError, match=r"cannot tell which weights model.pretrained='tiny' names"
    ):
        run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    assert not list((tmp_path / "results").rglob("record.json"))
    _, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", "dry_run=true")
    assert "[dry-run]" in out  # a dry run still lists it


def test_dry_run_says_for_every_cell_why_it_would_run_or_be_skipped(tmp_path, monkeypatch, capsys):
    run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=2")
    _, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=2", "dry_run=true")
    assert "[dry-run]" in out and "finished: skipped" in out
    _, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=5", "dry_run=true")
    assert "new settings; finished cell" in out and "benchmark.limit: 2 -> 5" in out
    _, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=2", "dry_run=true", "force=true")
    assert "force=true re-runs it" in out
    assert len(list((tmp_path / "results").rglob("record.json"))) == 1  # a dry run writes nothing


def test_identity_ignores_what_cannot_change_a_result_and_normalises_equivalent_configs(tmp_path):
    identity = functools.partial(cell_identity, tmp_path)

    base = identity()
    assert identity("launcher=accelerate", "launcher.num_processes=2") == base
    assert identity("logger=wandb", f"paths.data_dir={tmp_path}", "experiment_name=other") == base
    assert identity("method.label=renamed", "force=true") == base
    assert identity("method.params.seed=0") == base  # the default, spelled out
    vanilla = [identity("method=vanilla", f"method.retention_ratio={r}") for r in (0.1, 0.5)]
    assert vanilla[0] == vanilla[1] and vanilla[0]["method"]["retention_ratio"] == 1.0
    for changed in ("benchmark.batch_size=2", "model.dtype=bfloat16", "model.attn_implementation=eager"):
        assert identity(changed) != base, changed
    with pytest.raises(ValueError, match=r"unknown config key benchmark\.future_option"):
        identity("+benchmark.future_option=1")  # a key no reader reads would do nothing: refused
    assert identity("benchmark.protocol=llava", "benchmark.tasks=[globalcom2_demo]") != base
    # compile mode: off is the identity every cell had before the option existed; on is recorded by mode
    assert "compile" not in base and "compile" not in base["model"] and identity("compile=false") == base
    compiled = identity("compile=true")
    assert compiled != base and compiled["model"]["compile"] == "default"  # the CPU's default mode
    assert identity("compile=default") == compiled and identity("compile=max-autotune") != compiled
    with pytest.raises(ValueError, match="compile must be true, false or one of default, reduce-overhead"):
        identity("compile=fast")
    # the batch-invariant mode changes the numbers: in the identity when on, absent (as before it existed) when off
    assert "batch_invariant" not in base["model"] and identity("batch_invariant=false") == base
    invariant = identity("batch_invariant=true")
    assert (
        invariant != base
        and invariant["model"]["batch_invariant"] is True
        and "batch_invariant" not in invariant
    )
    spec = CellSpec.from_config(compose_cell(tmp_path, "batch_invariant=true"))
    assert spec.run_spec().model.batch_invariant is True and CellSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="batch_invariant=true cannot run with compile=True"):
        identity("batch_invariant=true", "compile=true")
    # vicuna_text changes a random-initialised model's prompts: in the identity when on, absent when off
    random_7b = ("model=llava_next_7b", "model.random_init=true", "model.device=cpu")
    assert "vicuna_text" not in identity(*random_7b)["model"]
    assert identity(*random_7b, "model.vicuna_text=false") == identity(*random_7b)
    assert identity(*random_7b, "model.vicuna_text=true")["model"]["vicuna_text"] is True
    fitted = CellSpec.from_config(compose_cell(tmp_path, *random_7b, "model.vicuna_text=true"))
    assert fitted.run_spec().model.vicuna_text is True and CellSpec.from_dict(fitted.to_dict()) == fitted
    with pytest.raises(ValueError, match=r"model\.vicuna_text=true needs model\.random_init=true"):
        identity("model=llava_next_7b", "model.vicuna_text=true")
    # prefetching changes when a batch is prepared, not what is in it: same identity, and it reaches the plugin
    assert identity("prefetch=false") == base and "prefetch" not in base
    serial = CellSpec.from_config(compose_cell(tmp_path, "prefetch=false"))
    assert serial.run_spec().options.prefetch is False
    assert CellSpec.from_dict(serial.to_dict()) == serial
    assert CellSpec.from_config(compose_cell(tmp_path)).run_spec().options.prefetch is None  # auto
    assert CellSpec.from_config(compose_cell(tmp_path, "prefetch=true")).run_spec().options.prefetch is True
    with pytest.raises(ValueError, match="prefetch must be true, false or auto, got 'sometimes'"):
        identity("prefetch=sometimes")
    # so do the threads that prepare them
    assert identity("prefetch=true", "prefetch_threads=3") == base and "prefetch_threads" not in base
    threaded = CellSpec.from_config(compose_cell(tmp_path, "prefetch=true", "prefetch_threads=3"))
    assert threaded.run_spec().options.prefetch_threads == 3
    assert CellSpec.from_dict(threaded.to_dict()) == threaded
    assert CellSpec.from_config(compose_cell(tmp_path)).run_spec().options.prefetch_threads is None  # auto
    with pytest.raises(ValueError, match="prefetch_threads=2 needs prefetching, but prefetch=false"):
        identity("prefetch=false", "prefetch_threads=2")
    with pytest.raises(ValueError, match="prefetch_threads must be auto or an integer from 1 to 16, got 0"):
        identity("prefetch_threads=0")
    # and whether they are read back from an earlier cell (the same tensors: tests/lmms/test_input_cache.py)
    assert identity("input_cache_gib=2") == base and "input_cache_gib" not in base
    cached = CellSpec.from_config(compose_cell(tmp_path, "input_cache_gib=0.5"))
    assert cached.run_spec().options.input_cache_gib == 0.5
    assert CellSpec.from_dict(cached.to_dict()) == cached
    assert CellSpec.from_config(compose_cell(tmp_path)).run_spec().options.input_cache_gib == 0.0  # off
    with pytest.raises(ValueError, match=r"input_cache_gib must be 0 \(off\) or a size in GiB .*got -1"):
        identity("input_cache_gib=-1")


def test_the_identity_names_the_kind_of_device_an_unset_one_resolves_to(tmp_path, monkeypatch):
    """``cpu:0`` computes what ``cpu`` does, and an unset device is this process's (CUDA where present): a
    result computed on a CPU is never served to the same config run on a GPU, nor the reverse."""
    identity = functools.partial(cell_identity, tmp_path)
    cpu = identity("model.device=cpu")
    assert cpu["model"]["device"] == "cpu"
    assert identity("model.device=cpu:0") == cpu
    assert identity("model.device=null") == cpu  # this machine has no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = identity("model.device=null")
    assert on_gpu["model"]["device"] == "cuda" and on_gpu != cpu


def test_the_completion_check_is_repeated_under_the_lock(tmp_path, monkeypatch, capsys):
    """A runner that saw the cell unfinished, then got the lock after another runner finished it, reuses it
    instead of deleting it and running it again."""
    first, _ = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    real = Cell.read_record
    calls = []

    def stale_first_look(self):  # as if checked before the other runner committed
        calls.append(1)
        return None if len(calls) == 1 else real(self)

    monkeypatch.setattr(Cell, "read_record", stale_first_look)
    again, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    assert "finished by another process meanwhile" in out and "[run]" not in out
    assert again == first
    record_path = Path(first["cell"]["path"]) / "record.json"
    assert json.loads(record_path.read_text())["finished"] == first["finished"]


def test_a_record_this_checkout_rejects_stops_the_run_and_is_kept_until_force(tmp_path, monkeypatch, capsys):
    """A newer checkout's record (another schema, same identity version) in a shared results folder is
    neither reused nor taken for "not run yet", which deleted it; force=true replaces it."""
    first, _ = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    record_path = Path(first["cell"]["path"]) / "record.json"
    newer = {**first, "schema": first["schema"] + 1}
    record_path.write_text(json.dumps(newer))
    _, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", "dry_run=true")
    assert "is not this cell's finished record" in out and "not run yet" not in out
    with pytest.raises(
        run_module.CellError, match=r"record\.json is not this cell's finished record.*schema"
    ):
        run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    assert json.loads(record_path.read_text()) == newer
    replaced, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", "force=true")
    assert "force=true replaces it" in out and replaced["schema"] == first["schema"]


def test_a_cell_folder_copied_to_another_experiment_runs_again_there(tmp_path, monkeypatch, capsys):
    """``cp -r results/exp results/exp_old``, then a run under ``exp_old``: the copy's record names ``exp``,
    which the report would not table under ``exp_old``, so the run does not call it done."""
    first, _ = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", "experiment_name=exp")
    shutil.copytree(tmp_path / "results" / "exp", tmp_path / "results" / "exp_old")
    with pytest.raises(run_module.CellError, match=r"belongs to exp/.*not to this folder"):
        run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", "experiment_name=exp_old")
    again, out = run_cell(
        tmp_path, monkeypatch, capsys, "benchmark.limit=1", "experiment_name=exp_old", "force=true"
    )
    assert "[run]" in out and again["cell"]["experiment"] == "exp_old"
    assert again["cell"]["id"] == first["cell"]["id"]


def test_a_busy_cell_is_not_run_and_the_run_fails_loudly(tmp_path, monkeypatch, capsys):
    cfg = compose_cell(tmp_path, "benchmark.limit=1")
    spec = CellSpec.from_config(cfg)
    cell = Cell(tmp_path / "results", spec.key, spec.identity(cfg))
    with cell.lock(), pytest.raises(run_module.CellError, match="being run by another process"):
        run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    assert "[busy]" in capsys.readouterr().out
    assert not cell.record_path.exists()


def test_a_cell_kept_by_a_stray_worker_is_not_taken_for_a_running_duplicate(tmp_path, monkeypatch, capsys):
    """Vanilla at R = 0.5 resolves to the r1.0 cell: when that cell is busy, another job runs it and this one
    prints [same] and succeeds. When only a stray rank of a dead run holds it, nobody runs it: the job fails."""
    from globalcom2 import store

    overrides = ("benchmark.limit=1", "method=vanilla", "method.retention_ratio=0.5")
    cfg = compose_cell(tmp_path, *overrides)
    spec = CellSpec.from_config(cfg)
    cell = Cell(tmp_path / "results", spec.key, spec.identity(cfg))
    cell.partial_dir.mkdir(parents=True)
    store.hold_worker_lock(cell.partial_dir)  # as a rank of an earlier run that outlived it
    try:
        with pytest.raises(run_module.CellError, match="a worker process of an earlier run"):
            run_cell(tmp_path, monkeypatch, capsys, *overrides)
    finally:
        os.close(store._worker_lock_fd)
        store._worker_lock_fd = None
    assert "[same]" not in capsys.readouterr().out


def test_a_llava_cell_records_its_protocol_and_honours_gen_kwargs(tmp_path, monkeypatch, capsys):
    record, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=2", "benchmark.protocol=llava")
    assert "protocol=llava" in out
    assert record["run"]["protocol"] == "llava" and record["run"]["geometry"] == "llava"
    assert record["run"]["generation_overrides"] == {"max_new_tokens": 2}
    assert record["cell"]["identity"]["benchmark"]["protocol"] == "llava"
    lines = (Path(record["cell"]["path"]) / "sample_records.jsonl").read_text().splitlines()
    assert all(json.loads(line)["output_tokens"] <= 2 for line in lines)


def test_a_cell_loads_the_commit_its_identity_names_when_main_moves_meanwhile(tmp_path, monkeypatch, capsys):
    """``main`` moves to another commit after the identity was computed (a push between the two reads): the
    cell still checks, loads and records the commit it is stored under (``CellSpec.pinned``); naming that
    commit as ``model.revision`` is the same cell."""
    repo, older, newer = "example-org/tiny-llava-next-hub", "a" * 40, "b" * 40
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshots = {older: tiny_checkpoint(1), newer: tiny_checkpoint(0)}
    refs_main = fake_hub_repo(tmp_path / "hub", repo, snapshots, main=older) / "refs" / "main"
    check_environment = cells_module.CellSpec.check_environment

    def push_then_check(self, memo=None):
        refs_main.write_text(newer)  # main moves after the identity resolved the older commit
        return check_environment(self, memo)

    loads = []
    load = globalcom2.load_llava_next

    def spy(pretrained, **kwargs):
        loads.append((pretrained, kwargs.get("revision")))
        return load(pretrained, **kwargs)

    monkeypatch.setattr(cells_module.CellSpec, "check_environment", push_then_check)
    monkeypatch.setattr(globalcom2, "load_llava_next", spy)  # what the plugin calls
    record, _ = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1", f"model.pretrained={repo}")
    assert record["cell"]["identity"]["weights"] == {"hub": repo, "commit": older}
    assert record["spec"]["model"]["revision"] == older
    assert loads == [(repo, older)]
    assert record["run"]["revision"] == older  # what the plugin loaded, in the record beside the identity
    assert "revision" not in record["cell"]["identity"]["model"]  # the commit names the content

    refs_main.write_text(older)
    again, out = run_cell(
        tmp_path,
        monkeypatch,
        capsys,
        "benchmark.limit=1",
        f"model.pretrained={repo}",
        f"+model.revision={older}",
    )
    assert "[done]" in out and again["cell"]["id"] == record["cell"]["id"], out


def test_a_pinned_spec_reaches_the_worker_processes_unchanged(tmp_path):
    """Several processes read the spec from ``cell_spec.json`` (``globalcom2.run.execute``): the pinned
    commits (the weights', a hub task's) survive the round trip, and a record from before either existed
    still reads."""
    cfg = compose_cell(tmp_path, "model.pretrained=example-org/repo", "launcher=accelerate")
    identity = {
        "weights": {"hub": "example-org/repo", "commit": "a" * 40},
        "data": {
            "gqa_lite": {"hub": "org/lite", "config": "gqa", "commit": "b" * 40},
            "pope_adv_local": {"kind": "hub", "repo": "lmms-lab/POPE", "content": {}},  # a folder: not pinned
        },
    }
    spec = CellSpec.from_config(cfg).pinned(identity)
    assert spec.model.revision == "a" * 40
    assert spec.benchmark.dataset_commits == (("gqa_lite", "b" * 40),)
    assert CellSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    older = spec.to_dict()
    del older["model"]["revision"], older["benchmark"]["dataset_commits"]
    assert CellSpec.from_dict(older).model.revision is None
    assert CellSpec.from_dict(older).benchmark.dataset_commits == ()
    unpinned = CellSpec.from_config(cfg)
    assert unpinned.pinned({"weights": {"files": {}}, "data": {}}) == unpinned  # a folder: unchanged
    # the data's pins are the identity's data, not another benchmark setting
    assert spec.identity(cfg)["benchmark"] == unpinned.identity(cfg)["benchmark"]


def test_a_vicuna_length_cell_runs_on_the_efficiency_split(tmp_path, monkeypatch, capsys):
    """The whole path of ``make bench-throughput --random-init``, in process on a shrunken random-init 7B:
    Hydra, the store, lmms-eval's efficiency task (whose prompts carry the task's post-prompt) and the
    plugin. Every row reaches the model with the recorded Vicuna count of its whole prompt. (Only bare
    questions had counts once, and every such cell failed at its first prompt.)"""
    from helpers import shrink_random_init_7b

    from globalcom2.data import demo
    from globalcom2.protocol.vicuna_length import POST_PROMPT_TOKENS, VICUNA_TEXT_TOKENS
    from globalcom2.sample_records import read_jsonl

    shrink_random_init_7b(monkeypatch)
    overrides = (
        "model=llava_next_7b", "model.random_init=true", "model.vicuna_text=true", "model.device=cpu",
        "model.dtype=float32", "benchmark=efficiency", "benchmark.limit=3", "benchmark.batch_size=2",
        "method=globalcom2", "method.retention_ratio=0.25",
    )  # fmt: skip
    record, out = run_cell(tmp_path, monkeypatch, capsys, *overrides)
    assert "[ok]" in out and record["spec"]["model"]["vicuna_text"] is True
    records = read_jsonl(Path(record["cell"]["path"]) / "sample_records.jsonl")
    questions = {item.index: item.question for item in demo.generate_items("efficiency", size=3)}
    assert sorted(r.doc_id for r in records) == [0, 1, 2]
    for r in records:
        assert r.text_tokens == VICUNA_TEXT_TOKENS[questions[r.doc_id]] + POST_PROMPT_TOKENS


LITE = "lmms-lab-encoder/LMMs-Eval-Lite"


def cache_vqav2_lite(cache: Path, commit: str, mtime: float, rows: int = 2) -> Path:
    """A download of LMMs-Eval-Lite's ``vqav2_val`` configuration at ``commit``, as ``datasets`` caches it,
    with ``rows`` rows of the fields ``vqav2_val_lite`` reads."""
    columns = {
        "question_id": list(range(rows)),
        "question": [f"What is shown in picture {i}?" for i in range(rows)],
        "answer": ["square"] * rows,
        "answers": [[{"answer": "square", "answer_id": j} for j in range(10)] for _ in range(rows)],
        "image": [synthetic_image(336 + 32 * i, 336) for i in range(rows)],
    }
    return cached_hub_dataset(cache, LITE, "vqav2_val", commit, columns, "lite", mtime=mtime)


@pytest.fixture
def lite_cache(tmp_path, monkeypatch):
    """lmms-eval's datasets cache (``LMMS_EVAL_DATASETS_CACHE``) under ``tmp_path``: lmms-eval resolves it
    once per process, so the memo is cleared here and again afterwards (later tests must not read a
    deleted folder)."""
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    _resolve_hf_datasets_cache_dir.cache_clear()
    yield tmp_path / "datasets"
    _resolve_hf_datasets_cache_dir.cache_clear()


def test_a_lite_cell_names_the_commit_datasets_would_load(tmp_path, lite_cache):
    """The LMMs-Eval-Lite tasks are lmms-eval's own and read the hub: a new commit of the dataset is another
    cell. Offline, ``datasets`` loads its newest cached copy whatever the hub cache's ``refs/main`` says, so
    that copy is the commit named (the ref was, and named data the cell never read); a cell whose commit
    cannot be named is never run."""
    lite = ("benchmark=vqav2", "benchmark.lite=true")
    cache_vqav2_lite(lite_cache, "a" * 40, mtime=1_000)
    first = cell_identity(tmp_path, *lite)
    assert first["data"]["vqav2_val_lite"] == {"hub": LITE, "config": "vqav2_val", "commit": "a" * 40}
    cache_vqav2_lite(lite_cache, "b" * 40, mtime=2_000)
    assert cell_identity(tmp_path, *lite)["data"]["vqav2_val_lite"]["commit"] == "b" * 40
    shutil.rmtree(lite_cache)
    assert "unresolved" in cell_identity(tmp_path, *lite)["data"]["vqav2_val_lite"]
    with pytest.raises(run_module.CellError, match="cannot tell which data task 'vqav2_val_lite' would read"):
        run_module.run(compose_cell(tmp_path, *lite))


def test_a_lite_cell_reads_the_commit_it_names_and_other_data_is_refused(
    tmp_path, lite_cache, monkeypatch, capsys
):
    """Through ``globalcom2.run``, lmms-eval and ``datasets``: the cell's task is built at its identity's
    commit (the results' task config says so) and reads that commit's rows. Offline, ``datasets`` ignores
    the revision and loads its newest copy, so data that changed between the identity and the load (another
    process's download) would be scored under the old identity: it is refused once loaded instead."""
    from globalcom2.lmms import api
    from globalcom2.lmms.hub_data import LoadedDataMismatch
    from globalcom2.lmms.plugin import GlobalCom2LlavaNext

    cache_vqav2_lite(lite_cache, "a" * 40, mtime=1_000)
    record, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark=vqav2", "benchmark.lite=true")
    assert "[ok]" in out, out
    assert record["cell"]["identity"]["data"]["vqav2_val_lite"]["commit"] == "a" * 40
    results = json.loads((Path(record["cell"]["path"]) / record["files"]["results"]).read_text())
    assert results["configs"]["vqav2_val_lite"]["dataset_kwargs"] == {"token": True, "revision": "a" * 40}
    assert record["n_samples"] == {"vqav2_val_lite": 2}

    lm = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.25)
    with pytest.raises(
        LoadedDataMismatch, match=rf"vqav2_val_lite' read \S+/{'a' * 40}, not commit {'c' * 40}"
    ):
        api.evaluate(lm, ["vqav2_val_lite"], limit=1, dataset_commits={"vqav2_val_lite": "c" * 40})


def test_what_only_chose_the_tasks_or_named_a_folder_is_not_in_the_identity(tmp_path, monkeypatch):
    """An edited lite_tasks list (with lite off) and two spellings of one checkpoint folder changed the id,
    re-running cells whose tasks and weights were the same."""
    base = cell_identity(tmp_path)
    assert cell_identity(tmp_path, "benchmark.lite_tasks=[vqav2_val_lite]") == base
    assert "lite" not in base["benchmark"] and "lite_tasks" not in base["benchmark"]
    folder = tmp_path / "checkpoints" / "mine"
    shutil.copytree(tiny_checkpoint(0), folder)
    absolute = cell_identity(tmp_path, f"model.pretrained={folder}")
    monkeypatch.chdir(folder.parent)
    assert cell_identity(tmp_path, "model.pretrained=./mine/") == absolute
    assert "pretrained" not in absolute["model"] and "files" in absolute["weights"]
    hub = cell_identity(tmp_path, "model=llava_next_7b", "model.random_init=true", "model.device=cpu")
    assert hub["model"]["pretrained"] == "llava-hf/llava-v1.6-vicuna-7b-hf"  # a hub id is kept as named


def test_the_process_count_is_in_the_identity_only_where_it_changes_what_a_batch_holds(tmp_path):
    """Each process batches its own share of the documents: at batch size 1, or in the batch-invariant mode,
    that changes no answer (one identity); with batch size > 1 otherwise it can (bf16 on a GPU)."""

    identity = functools.partial(cell_identity, tmp_path)

    two = ("launcher=accelerate", "launcher.num_processes=2")
    assert identity(*two) == identity()
    batched = identity("benchmark.batch_size=4", *two)
    assert batched != identity("benchmark.batch_size=4") and batched["launcher"] == {"num_processes": 2}
    invariant = ("benchmark.batch_size=4", "batch_invariant=true")
    assert identity(*invariant, *two) == identity(*invariant)


def test_the_process_count_is_in_the_identity_of_a_sampled_cell(tmp_path):
    """Every rank seeds alike, so a sampled document's draw depends on which documents its rank sampled
    before it: 1 and 2 processes are two cells, at batch size 1 and in the batch-invariant mode too."""
    identity = functools.partial(cell_identity, tmp_path)
    two = ("launcher=accelerate", "launcher.num_processes=2")
    sampled = "benchmark.gen_kwargs={do_sample:true,temperature:0.7}"
    assert identity(sampled, *two) != identity(sampled)
    assert identity(sampled, *two)["launcher"] == {"num_processes": 2}
    assert identity(sampled, "batch_invariant=true", *two) != identity(sampled, "batch_invariant=true")
    greedy = "benchmark.gen_kwargs={temperature:0.7,do_sample:false}"  # a temperature that goes unused
    assert identity(greedy, *two) == identity(greedy)
    # the demo task's YAML says do_sample: false, which an override's temperature alone does not turn on
    llava_greedy = ("benchmark.protocol=llava", "benchmark.gen_kwargs={temperature:0.2}")
    assert identity(*llava_greedy, *two) == identity(*llava_greedy)
    llava_sampled = ("benchmark.protocol=llava", "benchmark.gen_kwargs={do_sample:true,temperature:0.2}")
    assert identity(*llava_sampled, *two) != identity(*llava_sampled)
    assert identity("benchmark.protocol=llava", *two) == identity("benchmark.protocol=llava")


def test_a_task_sampling_by_its_own_yaml_is_seen_and_an_unreadable_one_counts_as_sampling(
    tmp_path, monkeypatch
):
    from globalcom2.cells import BenchmarkSpec
    from globalcom2.lmms import preflight

    pope = ("pope_adv_local",)  # under llava its YAML is not read: LLaVA samples iff temperature > 0
    assert BenchmarkSpec("pope", pope, (), None, 1, None, protocol="llava").may_sample() is False
    assert BenchmarkSpec("pope", pope, (), None, 1, "temperature=0.2", protocol="llava").may_sample() is True
    spec = BenchmarkSpec("demo", ("globalcom2_demo",), (), None, 1, None)
    assert spec.may_sample() is False  # its YAML says temperature 0
    # a group's settings are its subtasks', not read here
    assert BenchmarkSpec("mmbench", ("mmbench",), (), None, 1, None).may_sample() is True
    own = {"globalcom2_demo": {"temperature": 0.5}}
    monkeypatch.setattr(preflight, "task_generation_kwargs", lambda tasks, include_path=None: own)
    assert spec.may_sample() is True
    monkeypatch.setattr(
        preflight, "task_generation_kwargs", lambda tasks, include_path=None: {"globalcom2_demo": None}
    )
    assert spec.may_sample() is True


def test_a_multi_process_cpu_cell_runs_on_the_cpu_and_a_gpu_cell_on_each_rank_s_device(tmp_path, monkeypatch):
    """With several processes each rank takes its own GPU; a CPU cell must stay on the CPU its identity names
    (on a machine with GPUs, Accelerate would otherwise hand every rank a GPU)."""
    import globalcom2.lmms.plugin as plugin
    from globalcom2.worker import evaluate_cell

    devices = []

    class Built(Exception):
        pass

    def capture(run):
        devices.append(run.model.device)
        raise Built

    monkeypatch.setattr(plugin, "GlobalCom2LlavaNext", capture)
    spec = CellSpec.from_config(compose_cell(tmp_path, "launcher=accelerate", "launcher.num_processes=2"))
    assert spec.model.device == "cpu"
    on_gpu = CellSpec.from_dict({**spec.to_dict(), "model": {**spec.to_dict()["model"], "device": "cuda:0"}})
    for cell in (spec, on_gpu):
        with pytest.raises(Built):
            evaluate_cell(cell, tmp_path)
    assert devices == ["cpu", None]


def test_a_cell_releases_its_model_when_the_evaluation_fails(tmp_path, monkeypatch):
    """The worker releases the plugin (its compiled layers, ``GlobalCom2LlavaNext.release``) at the cell's
    end, an evaluation that raises included: a later cell of the Hydra process must not inherit its state."""
    import globalcom2.lmms.api as api
    import globalcom2.lmms.plugin as plugin
    from globalcom2.worker import evaluate_cell

    released = []

    class Plugin:
        def __init__(self, run):
            pass

        def release(self, failed=False):
            released.append(failed)

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(plugin, "GlobalCom2LlavaNext", Plugin)
    monkeypatch.setattr(api, "evaluate", failing_evaluate)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        evaluate_cell(CellSpec.from_config(compose_cell(tmp_path)), tmp_path)
    assert released == [True]  # released, as a failed run


def test_task_files_and_data_count_by_content_not_by_path(tmp_path, monkeypatch):
    """Other task files under ``paths.tasks_dir`` (an edited prompt) or another data folder of the same name
    make another cell; an identical copy elsewhere is the same cell."""
    import datasets

    from globalcom2.data.fixtures import write_fixtures

    identity = functools.partial(cell_identity, tmp_path)

    original = identity()
    copy = tmp_path / "tasks_copy"
    shutil.copytree(CONFIGS.parent / "tasks", copy)
    monkeypatch.setenv(TASKS_DIR_ENV, str(copy))  # what globalcom2.run makes of paths.tasks_dir
    assert identity() == original
    demo = copy / "demo" / "globalcom2_demo.yaml"
    demo.write_text(demo.read_text().replace("max_new_tokens: 8", "max_new_tokens: 1"))
    edited = identity()
    assert set(edited["task_definitions"]) == {"globalcom2_demo"}
    assert edited["task_definitions"] != original["task_definitions"]
    monkeypatch.delenv(TASKS_DIR_ENV)

    pope = ("benchmark=pope", "benchmark.gen_kwargs=null")
    data = write_fixtures(tmp_path / "data", ["pope"])
    monkeypatch.setenv("GLOBALCOM2_DATA_DIR", str(data))
    first = identity(*pope)
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    monkeypatch.setenv("GLOBALCOM2_DATA_DIR", str(moved))
    assert identity(*pope) == first  # the same rows in another place
    (moved / "pope" / "globalcom2_source.json").unlink()  # a folder without its sidecar still counts
    no_sidecar = identity(*pope)
    split = next((moved / "pope").rglob("state.json")).parent
    rows = datasets.load_from_disk(str(split))
    rows.select(range(len(rows) - 1)).save_to_disk(str(tmp_path / "fewer"))  # one row fewer
    shutil.rmtree(split)
    shutil.copytree(tmp_path / "fewer", split)
    changed = identity(*pope)
    assert changed["data"] != no_sidecar["data"], "the rows alone tell the two folders apart"
    assert all(
        digest
        for task in changed["data"].values()
        for files in task["content"].values()
        for digest in files.values()
    )
    downloads = []  # the same rows downloaded twice, as `make data` writes them (from_parquet, then saved)
    for attempt in ("first", "second"):
        parquet = tmp_path / attempt / "rows.parquet"
        parquet.parent.mkdir()
        rows.select(range(len(rows) - 1)).to_parquet(str(parquet))
        table = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(tmp_path / attempt / "cache"))
        shutil.rmtree(split)
        table.save_to_disk(str(split))  # datasets' own fingerprint hashes the parquet's path and times
        downloads.append(identity(*pope))
    assert downloads[0] == downloads[1], "the same rows from two downloads are one cell"


def test_gen_kwargs_in_any_accepted_form_is_one_cell_and_bad_columns_fail_before_loading(
    tmp_path, monkeypatch, capsys
):
    """``benchmark.gen_kwargs`` as ``k=v``, a mapping or a JSON object: one parser, one canonical value, one
    identity, under both protocols; a paper column that is unknown or not computed from the cell's tasks is
    refused with the valid choices, not found missing after the whole evaluation."""

    identity = functools.partial(cell_identity, tmp_path)

    for protocol in ("lmms_eval", "llava"):
        forms = [
            "benchmark.gen_kwargs='max_new_tokens=2,temperature=0'",
            "benchmark.gen_kwargs={temperature:0,max_new_tokens:2}",
            """benchmark.gen_kwargs='{"max_new_tokens": 2, "temperature": 0}'""",
        ]
        ids = [identity(f"benchmark.protocol={protocol}", form) for form in forms]
        assert all(i == ids[0] for i in ids), protocol
        assert ids[0]["benchmark"]["gen_kwargs"] == "max_new_tokens=2,temperature=0.0"
        # numbers typed by key: a whole count written as a float, an integer temperature, are the same cell
        spelled = identity(
            f"benchmark.protocol={protocol}", "benchmark.gen_kwargs='max_new_tokens=2.0,temperature=0.0'"
        )
        assert spelled == ids[0], protocol
    with pytest.raises(TypeError, match=r"max_new_tokens must be an integer, got 2\.5"):
        identity("benchmark.gen_kwargs='max_new_tokens=2.5'")
    record, out = run_cell(
        tmp_path, monkeypatch, capsys, "benchmark.gen_kwargs={max_new_tokens:2}", "benchmark.limit=1"
    )
    assert "[run]" in out and record["spec"]["benchmark"]["gen_kwargs"] == "max_new_tokens=2"
    with pytest.raises(ValueError, match=r"unsupported generation_kwargs \['max_new_token'\]"):
        identity("benchmark.gen_kwargs={max_new_token:2}")
    with pytest.raises(ValueError, match=r"until=\['stop'\] cannot be written as lmms-eval's"):
        identity("benchmark.gen_kwargs={until:[stop]}")
    with pytest.raises(ValueError, match="does not survive lmms-eval's 'key=value,key=value'"):
        identity("""benchmark.gen_kwargs='{"until": "  stop  ", "max_new_tokens": 2}'""")  # would be "stop"
    with pytest.raises(ValueError, match="unknown column 'Bogus'; valid: VQAv2, GQA"):
        identity("benchmark.columns=[Bogus]")
    with pytest.raises(
        ValueError, match=r"'GQA' is computed from task\(s\) gqa_local, which benchmark\.tasks"
    ):
        identity("benchmark.columns=[GQA]")


def test_a_run_after_a_killed_forced_commit_reuses_the_finished_cell(tmp_path, monkeypatch, capsys):
    """A ``force=true`` re-run killed in its commit leaves the finished cell's files set aside; the next plain
    run puts them back under the lock and reuses the cell instead of evaluating it again."""
    first, _ = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    folder = Path(first["cell"]["path"])
    aside = folder / ".previous"  # as Cell.commit leaves it when killed after setting the old files aside
    aside.mkdir()
    for entry in [
        folder / "record.json",
        *(e for e in folder.iterdir() if e.name not in (".previous", "record.json")),
    ]:
        entry.rename(aside / entry.name)
    (folder / "half_moved_new_output.json").write_text("{}")
    again, out = run_cell(tmp_path, monkeypatch, capsys, "benchmark.limit=1")
    assert "[done]" in out and "[run]" not in out, out
    assert again == first and not (folder / "half_moved_new_output.json").exists()


@pytest.mark.parametrize("device", ["cuda:3", "mps"])
def test_a_multi_process_cell_refuses_a_device_its_ranks_would_not_use(tmp_path, device):
    cfg = compose_cell(tmp_path, f"model.device={device}", "launcher=accelerate", "launcher.num_processes=2")
    with pytest.raises(
        ValueError, match=rf"model\.device='{device}' with launcher\.num_processes=2: .*valid: cuda, cpu"
    ):
        CellSpec.from_config(cfg)


def test_a_method_is_identified_by_its_parameters_as_built(tmp_path, monkeypatch):
    """A default spelled out is the same cell; a default left unstated is named, so changing it in code makes
    another cell instead of serving the old one."""
    identity = functools.partial(cell_identity, tmp_path)
    fastv = identity("method=fastv")
    assert fastv["method"]["params"] == {
        "budget_basis": "positions",
        "K": 2,
    }  # budget_basis: unstated default
    assert identity("method=fastv", "+method.params.budget_basis=positions") == fastv
    assert identity("method=fastv", "method.params.K=3") != fastv

    from globalcom2.methods.fastv import FastV

    # the code's default basis moves; the config is unchanged
    monkeypatch.setattr(FastV.__init__, "__kwdefaults__", {"K": 2, "budget_basis": "patches"})
    moved = identity("method=fastv")
    assert moved["method"]["params"]["budget_basis"] == "patches" and moved != fastv


def test_dtype_auto_is_the_cell_of_the_dtype_it_loads_in(tmp_path):
    """``auto`` and the dtype it resolves to compute the same thing, so they are one cell; where the config
    names no dtype, ``auto`` stays apart (a re-run, never a stale cell)."""
    identity = functools.partial(cell_identity, tmp_path)
    assert identity("model.dtype=auto") == identity("model.dtype=float32")  # the tiny model's config says it
    assert identity("model.dtype=auto")["model"]["dtype"] == "float32"
    random_7b = ("model=llava_next_7b", "model.random_init=true", "model.device=cpu")
    assert identity(*random_7b, "model.dtype=auto") == identity(*random_7b, "model.dtype=float16")
    assert identity(*random_7b, "model.dtype=auto") != identity(*random_7b, "model.dtype=bfloat16")
    unnamed = tmp_path / "unnamed"
    shutil.copytree(tiny_checkpoint(0), unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["dtype"]
    (unnamed / "config.json").write_text(json.dumps(config))
    at_unnamed = identity(f"model.pretrained={unnamed}", "model.dtype=auto")
    assert at_unnamed["model"]["dtype"] == "auto"
    assert at_unnamed != identity(f"model.pretrained={unnamed}", "model.dtype=float32")
