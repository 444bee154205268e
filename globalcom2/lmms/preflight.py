"""Checks that run before any model is loaded: tasks, offline data, method, parameters, attention.

lmms-eval loads the model first and the tasks afterwards, and its CLI exits 0 when a task then fails
to load; a typo or a missing dataset would cost a model load and still look like success. The wrapper
CLI (``globalcom2.lmms.cli``) and the Python helper (``globalcom2.lmms.api``) call
:func:`preflight` first; it collects every problem and raises one :class:`PreflightError` listing them.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globalcom2.data.benchmarks import GENERATED_TASKS
from globalcom2.data.local import (
    MissingDataError,
    data_fingerprint,
    data_source,
    folder_fingerprint,
    require_benchmark_data,
)
from globalcom2.models.preload import model_problems
from globalcom2.paths import tasks_dir
from globalcom2.protocol.rules import DEFAULT_PROTOCOL, PROTOCOLS, check_tasks_covered
from globalcom2.run_spec import RunSpec, run_problems


class PreflightError(ValueError):
    """One or more problems found before loading anything; the message lists all of them."""


@dataclass(frozen=True)
class TaskCheck:
    """What preflight learned about one requested task.

    Attributes:
        name: the task (or group) name.
        origin: ``"globalcom2"`` (our ``tasks/``) or ``"lmms-eval"`` (a built-in, read from the hub).
        yaml_path: its config file (``None`` for built-in groups defined elsewhere).
        data_path: the local data folder it reads (our tasks), or ``None``.
        data_kind: ``"hub"`` / ``"synthetic-fixture"`` (from ``globalcom2_source.json``), ``"generated"``
            (the demo), or ``None``.
    """

    name: str
    origin: str
    yaml_path: str | None
    data_path: str | None
    data_kind: str | None


def _index(include_path: Any, include_defaults: bool) -> dict[str, dict[str, Any]]:
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    # indexing logs a DEBUG line per unloadable YAML, whatever the verbosity
    logger.disable("lmms_eval.tasks")
    try:
        return TaskManager("ERROR", include_path=include_path, include_defaults=include_defaults).task_index
    finally:
        logger.enable("lmms_eval.tasks")


@functools.cache
def _builtin_index() -> dict[str, dict[str, Any]]:
    """lmms-eval's built-in tasks (indexing ~2,000 YAMLs takes seconds; they cannot change in-process)."""
    return _index(None, include_defaults=True)


def task_yaml(path: str) -> dict[str, Any]:
    """A task YAML as lmms-eval reads it (``include`` resolved, ``!function`` tags not loaded)."""
    from lmms_eval import utils

    return utils.load_yaml_config(path, mode="simple")


def _test_split(config: dict[str, Any]) -> str:
    if config.get("test_split"):
        return config["test_split"]
    if config.get("base_yaml"):
        import lmms_eval.tasks

        base = task_yaml(str(Path(lmms_eval.tasks.__file__).parent / config["base_yaml"]))
        if base.get("test_split"):
            return base["test_split"]
    raise PreflightError(f"cannot tell which split the task config {config.get('task')!r} evaluates")


def check_tasks(tasks: list[str], include_path: str | list[str] | None = None) -> list[TaskCheck]:
    """Every task must be known (ours or built-in) and, if ours, have its offline data on disk."""
    if not tasks:
        raise PreflightError("no tasks given")
    include_path = include_path if include_path is not None else str(tasks_dir())
    ours = _index(include_path, include_defaults=False)
    builtin: dict[str, dict[str, Any]] | None = None
    checks, problems = [], []
    for name in tasks:
        if name in ours:
            entry = ours[name]
            config = task_yaml(entry["yaml_path"])
            local_data = config.get("local_data")
            if local_data:
                try:
                    path = require_benchmark_data(local_data, _test_split(config), name)
                    kind = data_source(local_data).get("kind")
                except MissingDataError as err:
                    problems.append(str(err))
                    continue
                checks.append(TaskCheck(name, "globalcom2", entry["yaml_path"], str(path), kind))
            else:
                kind = "generated" if name in GENERATED_TASKS else None
                checks.append(TaskCheck(name, "globalcom2", entry["yaml_path"], None, kind))
            continue
        if builtin is None:
            builtin = _builtin_index()
        if name in builtin:
            path = builtin[name].get("yaml_path")
            checks.append(TaskCheck(name, "lmms-eval", None if path == -1 else path, None, None))
            continue
        close = difflib.get_close_matches(name, [*ours, *builtin], n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        problems.append(
            f"unknown task {name!r}.{hint} Offline tasks of this harness: {', '.join(sorted(ours))}."
        )
    if problems:
        raise PreflightError("\n".join(["cannot run:", *(f"- {p}" for p in problems)]))
    return checks


def data_identity(tasks: list[str], include_path: str | list[str] | None = None) -> dict[str, Any]:
    """What data each task reads, for a cell's identity: its folder's ``globalcom2_source.json`` (kind, hub
    repo, config, split, revision, files, rows; not the download date) and, under ``content``, what the
    folder holds (:func:`~globalcom2.data.local.data_fingerprint`). A generated task (the demo benchmark)
    gives its split, seed and size and the content of the folder it reads, built here if not yet cached
    (a few seconds), so an edited generator is another cell even where ``DEMO_VERSION`` was not bumped.
    A task that reads the hub itself (lmms-eval's LMMs-Eval-Lite tasks) gives its dataset, config and the
    commit ``datasets`` would load (:func:`globalcom2.lmms.hub_data.hub_data_identity`). Synthetic fixture
    rows and real data, two hub revisions, or two folders of one name on two machines thus make different
    cells."""
    ours = _index(include_path if include_path is not None else str(tasks_dir()), include_defaults=False)
    identity: dict[str, Any] = {}
    for name in tasks:
        config = task_yaml(ours[name]["yaml_path"]) if name in ours else {}
        if name in GENERATED_TASKS:
            identity[name] = _generated_identity(config)
            continue
        local_data = config.get("local_data")
        if not local_data:
            identity[name] = _hub_identity(name, config)
            continue
        source = {k: v for k, v in data_source(local_data).items() if k != "created"}
        identity[name] = {**source, "content": data_fingerprint(local_data)}
    return identity


def _hub_identity(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """:func:`~globalcom2.lmms.hub_data.hub_data_identity` of a task, read from its built-in YAML when it is
    not one of ours (``config`` empty)."""
    from globalcom2.lmms.hub_data import hub_data_identity

    if not config:
        found = _builtin_index().get(name)
        config = task_yaml(found["yaml_path"]) if found and "yaml_path" in found else {}
    return hub_data_identity(name, config)


def _generated_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The demo data a generated task's YAML (``demo_split``, ``demo_seed``, ``demo_size``, as
    ``globalcom2.lmms.tasks.DemoTask`` reads them) names: the split, seed and size, and the SHA-256 of the
    files of its cached folder (the rendered rows themselves)."""
    from globalcom2.data import demo

    split = config.get("demo_split", "test")
    seed, size = demo.split_settings(split, config.get("demo_seed"), config.get("demo_size"))
    folder = demo.ensure_demo_dataset(split=split, seed=seed, size=size)
    return {
        "kind": "generated",
        "split": split,
        "seed": seed,
        "size": size,
        "content": folder_fingerprint(folder),
    }


def task_identity(tasks: list[str], include_path: str | list[str] | None = None) -> dict[str, str | None]:
    """What defines each task, for a cell's identity: a SHA-256 over its YAML as lmms-eval reads it
    (``include`` resolved), the built-in YAML it inherits (``base_yaml``), and the source of every module a
    ``!function`` names that lmms-eval loads from a file beside a YAML (a built-in task's ``utils.py``).

    So an edited prompt, decoding setting or metric in a task file, a ``paths.tasks_dir`` pointing at
    other task files, or an lmms-eval release that changes a task's YAML or the ``utils.py`` beside it is
    another cell. Code elsewhere is not hashed, as no library is: lmms-eval's shared metrics
    (``lmms_eval/api/metrics.py``, ``_task_utils``), a ``!function`` resolved by module path, transformers
    and torch are recorded with their versions in every record (``provenance``); functions in this package
    (``globalcom2.lmms.task_utils``) are code, and a change that alters results bumps
    ``globalcom2.cells.IDENTITY_VERSION``. ``None``: a task lmms-eval indexes without a YAML of its own."""
    identity: dict[str, str | None] = {}
    for name, yaml_path, config, base_path in _task_yamls(tasks, include_path):
        if yaml_path is None:
            identity[name] = None
            continue
        parts = _definition(yaml_path, config)
        if base_path is not None:
            parts += _definition(base_path, task_yaml(str(base_path)))
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        identity[name] = digest.hexdigest()
    return identity


def _task_yamls(
    tasks: list[str], include_path: str | list[str] | None
) -> list[tuple[str, Path | None, dict[str, Any], Path | None]]:
    """``(task, its YAML, that YAML as lmms-eval reads it, the built-in YAML it inherits)`` per task, ours
    first, then lmms-eval's; ``(task, None, {}, None)`` for a task indexed without a YAML of its own."""
    ours = _index(include_path if include_path is not None else str(tasks_dir()), include_defaults=False)
    found: list[tuple[str, Path | None, dict[str, Any], Path | None]] = []
    for name in tasks:
        entry = ours.get(name) or _builtin_index().get(name) or {}
        yaml_path = entry.get("yaml_path")
        if not isinstance(yaml_path, str):
            found.append((name, None, {}, None))
            continue
        config = task_yaml(yaml_path)
        base_path = None
        if isinstance(base := config.get("base_yaml"), str):
            import lmms_eval.tasks

            base_path = Path(lmms_eval.tasks.__file__).parent / base
        found.append((name, Path(yaml_path), config, base_path))
    return found


def task_generation_kwargs(
    tasks: list[str], include_path: str | list[str] | None = None
) -> dict[str, dict[str, Any] | None]:
    """Each task's ``generation_kwargs`` as lmms-eval will build it: its YAML's own, else its ``base_yaml``'s
    (``{}``: none set, lmms-eval's greedy defaults); ``None`` for a group, a tag or a task without a YAML of
    its own, whose settings are unknown here."""
    settings: dict[str, dict[str, Any] | None] = {}
    for name, yaml_path, config, base_path in _task_yamls(tasks, include_path):
        if yaml_path is None or not isinstance(config.get("task"), str):
            settings[name] = (
                None  # a group (``task:`` lists its subtasks) or a tag: their settings are elsewhere
            )
            continue
        # as LocalDataTask merges them ({**base, **config}): a generation_kwargs of its own replaces the base's
        own = config.get("generation_kwargs")
        if own is None and base_path is not None:
            own = task_yaml(str(base_path)).get("generation_kwargs")
        settings[name] = dict(own or {})
    return settings


def _definition(yaml_path: Path, simple_config: dict[str, Any]) -> list[Any]:
    """A YAML's config as lmms-eval's simple mode reads it (includes resolved; ``!function`` tags as
    ``"!function <name>"``) and the source of each module a ``!function`` names that sits beside the YAML
    (lmms-eval's first lookup, ``import_function``)."""
    config = _tagged(simple_config)
    sources = {}
    for name in sorted(_functions(config)):
        module = name.rpartition(".")[0]
        path = yaml_path.parent / f"{module}.py"
        if module and path.is_file():
            sources[module] = hashlib.sha256(path.read_bytes()).hexdigest()
    return [config, sources]


def _tagged(value: Any) -> Any:
    """A simple-mode config as plain JSON values: lmms-eval leaves ``!function`` values as YAML nodes."""
    if isinstance(value, dict):
        return {str(k): _tagged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tagged(v) for v in value]
    if type(value).__name__ == "ScalarNode":  # PyYAML's, through lmms-eval (not a dependency of ours)
        return f"{value.tag} {value.value}"
    return value


def _functions(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [name for v in value.values() for name in _functions(v)]
    if isinstance(value, list):
        return [name for v in value for name in _functions(v)]
    if isinstance(value, str) and value.startswith("!function "):
        return [value.removeprefix("!function ")]
    return []


def llava_unused_options(
    gen_kwargs: str | None = None,
    system_instruction: str | None = None,
    num_fewshot: int | None = None,
    flag: str = "",
) -> str | None:
    """Why lmms-eval options that ``protocol=llava`` would silently not use were given, or ``None``.

    Under ``llava`` the prompt is LLaVA's question-file text and the decoding LLaVA's
    (``globalcom2.protocol.rules.TaskProtocol``): lmms-eval's context, where a system instruction and
    few-shot examples go, and its ``gen_kwargs`` are not read.
    """
    given = {
        "gen_kwargs": gen_kwargs or None,
        "system_instruction": system_instruction or None,
        "num_fewshot": num_fewshot or None,
    }
    unused = {name: value for name, value in given.items() if value is not None}
    if not unused:
        return None
    shown = ", ".join(f"{flag}{name}={value!r}" for name, value in unused.items())  # flag: "--" for the CLI
    return (
        f"{shown} would be ignored under protocol=llava (its prompts and generation settings are LLaVA's); "
        "adjust decoding with the plugin's generation_overrides, e.g. {'max_new_tokens': 8}"
    )


def check_model_args(model_args: dict[str, Any]) -> RunSpec:
    """Validate plugin ``model_args`` without loading any weight; returns the spec the plugin would run.

    The same front door as the plugin's own (:meth:`RunSpec.from_model_args`): the method, its parameters
    (types and ranges), the attention implementation and the plugin's options; then what the disk and the
    machine show (:func:`run_problems`): the checkpoint's ``config.json`` (local folder, cache, or hub when
    online) is LLaVA-NeXT AnyRes and has weights, layer indices fit its depths, the device and the compile
    backend exist. A value the front door refuses is listed with whatever is wrong with the checkpoint.
    """
    problems: list[str] = []
    spec = None
    try:
        spec = RunSpec.from_model_args(model_args)
    except (TypeError, ValueError) as err:
        problems.append(str(err))
    if spec is not None:
        problems += map(str, run_problems(spec))
    else:  # the front door stopped at the first bad value; still say what is wrong with the checkpoint
        pretrained = model_args.get("pretrained")
        random_init = str(model_args.get("random_init", False)).lower() == "true"
        problems += map(
            str,
            model_problems(
                str(pretrained) if pretrained else None,
                random_init=random_init,
                device=model_args.get("device"),
                revision=model_args.get("revision"),
            ),
        )
    if problems:
        raise PreflightError("\n".join(["cannot run:", *(f"- {p}" for p in dict.fromkeys(problems))]))
    assert spec is not None
    return spec


def preflight(
    tasks: list[str], *, include_path: str | list[str] | None = None, model_args: dict[str, Any] | None = None
) -> list[TaskCheck]:
    """All checks; raises :class:`PreflightError` listing every problem. ``model_args`` only for our plugin."""
    problems, checks = [], []
    if model_args is not None:
        try:
            check_model_args(model_args)
        except PreflightError as err:
            problems += str(err).splitlines()[1:]
    try:
        checks = check_tasks(tasks, include_path)
    except PreflightError as err:
        problems += str(err).splitlines()[1:]
    protocol = (model_args or {}).get("protocol", DEFAULT_PROTOCOL)
    if protocol in PROTOCOLS:  # an unknown protocol is reported by check_model_args
        try:
            check_tasks_covered(protocol, tasks)
        except ValueError as err:
            problems.append(f"- {err}")
    if problems:
        raise PreflightError("\n".join(["cannot run:", *problems]))
    return checks
