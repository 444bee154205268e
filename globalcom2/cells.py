"""A cell of the evaluation grid (model x method x retention ratio x benchmark), checked before anything loads.

:meth:`CellSpec.from_config` reads a composed Hydra config: the model, the method and the plugin's options go
through the one front door (:func:`globalcom2.run_spec.parse_run`, which the lmms-eval ``model_args`` path
uses too), the benchmark and the launcher are read here. Everything that can be wrong with a cell (an unknown
key, method or parameter, a ratio outside (0, 1], a malformed limit, batch size or seed, an unknown task,
missing offline data, a checkpoint that is not on disk while offline, has no weights or is not LLaVA-NeXT
AnyRes, a layer index past the model's depth, a device this machine lacks, a compile backend it lacks) fails
here, with a message that names the value and what is valid, before a weight or dataset is loaded.

:meth:`CellSpec.identity` is what the results store keys a finished cell on (``globalcom2/store.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

from globalcom2.models.fingerprint import checkpoint_identity
from globalcom2.models.loader import auto_dtype
from globalcom2.protocol.generation import (
    GenerationSettings,
    canonical_gen_kwargs,
    format_gen_kwargs,
    parse_gen_kwargs,
)
from globalcom2.protocol.rules import DEFAULT_PROTOCOL, check_tasks_covered
from globalcom2.records import CellKey
from globalcom2.run_spec import (
    HYDRA_KEYS,
    MethodSpec,
    ModelSpec,
    RunOptions,
    RunSpec,
    default_device,
    parse_overrides,
    parse_run,
    run_problems,
)

LAUNCH_TOOLS = ("auto", "accelerate", "torchrun")
#: Bump when a code change alters the results of unchanged configs (a prompt, a task's scoring), so that
#: cells finished before it are run again instead of being reused. The git SHA is recorded, not hashed:
#: a commit that changes nothing a cell computes must not re-run the grid.
IDENTITY_VERSION = 9  # 2: under protocol=llava, chunked tokenisation and FastV/SparseVLM budgets in patches;
# 3: the checkpoint's content (``weights``) joined the identity, so cells that may hold other weights run again;
# 4: the task definitions (``task_definitions``) and the data folders' content (``data.<task>.content``)
# joined it, and the process count where it changes batches; ScienceQA answers read as LLaVA's under llava;
# 5: a generated task's data (the demo benchmark's split, seed, size and rendered rows) joined it;
# 6: a hub task's dataset commit joined it (the lite tasks); benchmark.lite/lite_tasks (the task list says
# which ran) and a checkpoint folder's path (its files' SHA-256 say what loaded) left it; a llava
# generation_overrides temperature > 0 samples; 7: a method's parameters as the built method holds them
# (every default filled in), so a default changed in code is another cell, and a default spelled out is not;
# 8: under llava, a ScienceQA hint is stripped (whitespace alone is no hint) and an empty MMBench option or
# hint is absent, as in LLaVA's question files; 9: under llava, an MMBench option or hint that pandas reads as
# NaN ("NA", "N/A", "null" …) is absent, as after LLaVA's pd.read_table
#: Config keys that cannot change a cell's result, left out of its identity: where files go (``paths``; the
#: task files and data they point at are in it by content), how it is launched (N processes give the
#: answers of one, tests/harness/test_run_cells.py; the process count joins the identity where it changes
#: what a batch holds, :meth:`CellSpec.identity`), where it is logged, run switches, and the names that
#: already form the cell's folder.
NOT_IDENTITY = (
    "experiment_name",
    "force",
    "dry_run",
    "paths",
    "launcher",
    "logger",
    "hydra",
    "model.name",
    "model.revision",  # how the weights were named; ``weights`` holds the commit it resolved to
    "model.vicuna_text",  # in the identity from the spec, and only when on (cells from before it keep theirs)
    "method.label",
    "benchmark.name",
    "compile",  # in the identity as model.compile, and only when on (cells from before it keep their identity)
    "batch_invariant",  # in the identity as model.batch_invariant, and only when on (likewise)
    "prefetch",  # when the host prepares a batch, not what is in it (tests/lmms/test_plugin.py)
    "prefetch_threads",  # likewise: how many threads prepare them
    "input_cache_gib",  # whether they are read back from an earlier cell: the same tensors (test_input_cache.py)
)
#: The keys of each config group (``None``: the primary config's own). An override of any other key, such as
#: ``+benchmark.limt=3``, would do nothing, so it is refused (``tests/harness/test_config_keys_read.py``
#: checks these sets against the config files).
GROUP_KEYS: dict[str | None, frozenset[str]] = {
    None: frozenset(
        {"experiment_name", "seed", "force", "dry_run", "compile", "batch_invariant", "prefetch"}
        | {"prefetch_threads", "input_cache_gib"}
        | {"model", "method", "benchmark"}
        | {"launcher", "logger", "paths"}
    ),
    "model": frozenset(
        {
            "name",
            "pretrained",
            "revision",
            "random_init",
            "vicuna_text",
            "dtype",
            "device",
            "attn_implementation",
        }
    ),
    "method": frozenset({"name", "label", "retention_ratio", "params"}),
    "benchmark": frozenset(
        {"name", "tasks", "columns", "lite", "lite_tasks", "limit", "batch_size", "gen_kwargs", "protocol"}
    ),
    "launcher": frozenset({"name", "num_processes", "tool"}),
    "logger": frozenset({"name", "project", "entity", "mode", "group", "dir"}),
    "paths": frozenset({"root", "results_dir", "data_dir", "tasks_dir"}),
}


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # results folder name
    tasks: tuple[str, ...]
    columns: tuple[str, ...]  # paper-table columns (PAPER_METRICS keys) this benchmark fills
    limit: int | None
    batch_size: int
    gen_kwargs: str | None
    protocol: str = DEFAULT_PROTOCOL  # lmms_eval | llava (globalcom2.protocol.rules)
    # (task, commit) of each task that reads the hub, set by CellSpec.pinned from the identity's data: the
    # commit the task loads and is checked against (globalcom2.lmms.hub_data). Not itself in the identity.
    dataset_commits: tuple[tuple[str, str], ...] = ()

    def generation_overrides(self) -> dict[str, Any] | None:
        """Under ``llava``, ``gen_kwargs`` adjusts LLaVA's fixed settings in the plugin (lmms-eval gets none)."""
        if self.protocol != "llava" or not self.gen_kwargs:
            return None
        return parse_gen_kwargs(self.gen_kwargs, "benchmark.gen_kwargs")

    def lmms_gen_kwargs(self) -> str | None:
        """What lmms-eval's ``gen_kwargs`` gets: the override under ``lmms_eval``, nothing under ``llava``."""
        return None if self.protocol == "llava" else self.gen_kwargs

    def may_sample(self) -> bool:
        """Whether any task decodes by sampling, as the plugin will resolve its settings (the task's YAML, then
        ``gen_kwargs``; LLaVA's fixed settings and their overrides under ``llava``). ``True`` where a task's
        settings cannot be read here: a cell is then keyed more finely than needed, never too coarsely."""
        from globalcom2.lmms.preflight import task_generation_kwargs
        from globalcom2.protocol.rules import task_protocol

        lmms = (
            parse_gen_kwargs(self.lmms_gen_kwargs(), "benchmark.gen_kwargs") if self.lmms_gen_kwargs() else {}
        )
        from_yaml = task_generation_kwargs(list(self.tasks))
        for task in self.tasks:
            protocol = task_protocol(self.protocol, task)
            task_kwargs = {} if protocol.rule is not None else from_yaml.get(task)
            if task_kwargs is None:
                return True
            try:
                if protocol.generation({**task_kwargs, **lmms}, 1, self.generation_overrides()).do_sample:
                    return True
            except (TypeError, ValueError):
                return True
        return False


@dataclass(frozen=True)
class LauncherSpec:
    name: str
    num_processes: int
    tool: str


@dataclass(frozen=True)
class CellSpec:
    experiment: str
    seed: int
    model: ModelSpec
    method: MethodSpec
    benchmark: BenchmarkSpec
    launcher: LauncherSpec
    prefetch: bool | None = None  # RunOptions.prefetch (None: auto, on when the model runs on CUDA)
    prefetch_threads: int | None = None  # RunOptions.prefetch_threads (None: auto)
    input_cache_gib: float = 0.0  # RunOptions.input_cache_gib (0: off)

    @property
    def key(self) -> CellKey:
        return CellKey(
            self.experiment,
            self.model.name,
            self.method.label,
            self.method.retention_ratio,
            self.benchmark.name,
        )

    def run_spec(self) -> RunSpec:
        """What the plugin runs for this cell (validated values: nothing is checked again)."""
        options = RunOptions(
            batch_size=self.benchmark.batch_size,
            protocol=self.benchmark.protocol,
            generation_overrides=self.benchmark.generation_overrides(),
            prefetch=self.prefetch,
            prefetch_threads=self.prefetch_threads,
            input_cache_gib=self.input_cache_gib,
        )
        return RunSpec(model=self.model, method=self.method, options=options)

    def pinned(self, identity: dict[str, Any]) -> CellSpec:
        """This spec loading exactly what its ``identity`` (:meth:`identity`) names, so that a branch that
        moves after the identity was computed cannot put other weights or rows under it: a hub checkpoint at
        its resolved ``weights.commit``, and each task that reads the hub at its ``data.<task>.commit``
        (checked again once loaded, :mod:`globalcom2.lmms.hub_data`). Folders, random weights and local
        data are left as they are."""
        pinned = self
        weights = identity.get("weights") or {}
        if "commit" in weights:
            pinned = replace(pinned, model=replace(pinned.model, revision=weights["commit"]))
        commits = tuple(
            (task, data["commit"])
            for task, data in (identity.get("data") or {}).items()
            if isinstance(data, dict) and "hub" in data and "commit" in data
        )
        if commits:
            pinned = replace(pinned, benchmark=replace(pinned.benchmark, dataset_commits=commits))
        return pinned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellSpec:
        return cls(
            experiment=data["experiment"],
            seed=data["seed"],
            # a key an older spec lacks (batch_invariant) takes its default
            model=ModelSpec(**data["model"]),
            method=MethodSpec(**data["method"]),
            benchmark=BenchmarkSpec(
                **{
                    **data["benchmark"],
                    "tasks": tuple(data["benchmark"]["tasks"]),
                    "columns": tuple(data["benchmark"]["columns"]),
                    "dataset_commits": tuple(
                        (task, commit) for task, commit in data["benchmark"].get("dataset_commits", ())
                    ),
                }
            ),
            launcher=LauncherSpec(**data["launcher"]),
            prefetch=data.get("prefetch"),
            prefetch_threads=data.get("prefetch_threads"),
            input_cache_gib=data.get("input_cache_gib", 0.0),
        )

    @classmethod
    def from_config(
        cls, cfg: Any, *, ratio_without_budget: Literal["ignore", "refuse"] = "ignore"
    ) -> CellSpec:
        """Validated spec of the cell a composed config describes (nothing is loaded).

        ``ratio_without_budget``: ``"ignore"`` a ratio given to a method without a budget (vanilla) in a sweep,
        where every ratio of it is the one r1.0 cell; ``"refuse"`` it in a single run
        (:func:`globalcom2.run_spec.parse_run`).

        Raises ``ValueError``/``TypeError`` naming the bad key, its value and what is valid.
        """
        plain = _to_plain(cfg)
        check_keys(plain)
        method_cfg, bench_cfg, model_cfg = plain["method"], plain["benchmark"], plain["model"]
        protocol = bench_cfg.get("protocol", DEFAULT_PROTOCOL)
        run = parse_run(
            pretrained=model_cfg["pretrained"],
            method=method_cfg["name"],
            retention_ratio=method_cfg.get("retention_ratio"),
            method_params=method_cfg.get("params") or {},
            dtype=model_cfg.get("dtype", "auto"),
            device=None if model_cfg.get("device", "cpu") is None else str(model_cfg.get("device", "cpu")),
            attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
            random_init=model_cfg.get("random_init", False),
            vicuna_text=model_cfg.get("vicuna_text", False),
            revision=model_cfg.get("revision"),
            compile=plain.get("compile", False),
            batch_invariant=plain.get("batch_invariant", False),
            prefetch=plain.get("prefetch", "auto"),
            prefetch_threads=plain.get("prefetch_threads", "auto"),
            input_cache_gib=plain.get("input_cache_gib", 0),
            batch_size=bench_cfg.get("batch_size", 1),
            protocol=protocol,
            generation_overrides=bench_cfg.get("gen_kwargs") if protocol == "llava" else None,
            model_name=model_cfg["name"],
            method_label=method_cfg.get("label"),
            keys=HYDRA_KEYS,
            ratio_without_budget=ratio_without_budget,
        )
        bench_name, tasks = bench_cfg["name"], _task_list(bench_cfg.get("tasks"), "benchmark.tasks")
        columns = tuple(bench_cfg.get("columns") or ())
        if _flag(bench_cfg.get("lite", False), "benchmark.lite"):
            tasks = _task_list(bench_cfg.get("lite_tasks") or [], "benchmark.lite_tasks")
            if not tasks:
                raise ValueError(
                    f"benchmark {bench_name!r} has no LMMs-Eval-Lite subset; lite exists for vqav2, gqa, "
                    "vizwiz_vqa, textvqa, mmbench_en, mmbench_cn (and paper_suite, over those)"
                )
            bench_name, columns = f"{bench_name}_lite", ()  # paper columns are defined on the full sets
        if not tasks:
            raise ValueError(f"benchmark {bench_name!r} lists no tasks")
        limit = bench_cfg.get("limit")
        if limit is not None:
            limit = config_int(
                limit, "benchmark.limit", minimum=1, meaning="the first N documents; null: all"
            )
        gen_kwargs = _gen_kwargs(bench_cfg.get("gen_kwargs"))
        _check_columns(columns, tasks)
        benchmark = BenchmarkSpec(
            name=bench_name,
            tasks=tasks,
            columns=columns,
            limit=limit,
            batch_size=run.options.batch_size,
            gen_kwargs=gen_kwargs,
            protocol=run.options.protocol,
        )
        check_tasks_covered(benchmark.protocol, benchmark.tasks)
        launcher = _launcher(plain["launcher"])
        if launcher.num_processes > 1 and run.model.device not in MULTI_PROCESS_DEVICES:
            # each rank takes its own accelerator (the worker passes no device); a named one would be
            # recorded while the ranks ran elsewhere
            raise ValueError(
                f"model.device={run.model.device!r} with launcher.num_processes={launcher.num_processes}: each "
                "process takes its own GPU; valid: cuda, cpu, or unset (null)"
            )
        seed = config_int(plain.get("seed", 0), "seed", minimum=0)
        return cls(
            plain["experiment_name"],
            seed,
            run.model,
            run.method,
            benchmark,
            launcher,
            run.options.prefetch,
            run.options.prefetch_threads,
            run.options.input_cache_gib,
        )

    def identity(self, cfg: Any) -> dict[str, Any]:
        """Everything that can change this cell's result: the resolved config less :data:`NOT_IDENTITY`,
        with the values this spec normalised (vanilla's ratio, the method's parameters as built, defaults
        included, ints, the lite task list) in place of the raw ones, so that equivalent configs give one
        identity; plus the data each task reads and what defines each task (``preflight.data_identity``, ``preflight.task_identity``), the
        process count when the batches depend on it, the checkpoint's content (``weights``: its hub commit or
        its files' SHA-256, ``globalcom2.models.fingerprint``; the same name with other weights is another
        cell) and :data:`IDENTITY_VERSION`."""
        from globalcom2.lmms.preflight import data_identity, task_identity

        identity = _to_plain(cfg)
        for dotted in NOT_IDENTITY:
            parent, _, leaf = dotted.rpartition(".")
            node = identity.get(parent, {}) if parent else identity
            if isinstance(node, dict):
                node.pop(leaf, None)
        identity["seed"] = self.seed
        model = {k: v for k, v in asdict(self.model).items() if k not in ("name", "revision")}
        # the kind of device the cell computes on, not which one (cuda:1 gives cuda:0's answers); an unset
        # device is the one this process takes, CUDA where present (the plugin's rule; each rank's accelerator
        # follows it), so a result computed on a CPU is never served to the same config run on a GPU
        model["device"] = torch.device(self.model.device or default_device()).type
        if model["dtype"] == "auto":  # the dtype it loads in, so `auto` and the checkpoint's own are one cell
            model["dtype"] = (
                auto_dtype(
                    self.model.pretrained, random_init=self.model.random_init, revision=self.model.revision
                )
                or "auto"
            )
        if model["compile"] is None:
            del model["compile"]  # eager, as every cell before compile mode existed: the same identity
        if not model["batch_invariant"]:
            del model["batch_invariant"]  # likewise: cells from before the mode keep their identity
        if not model["vicuna_text"]:
            del model["vicuna_text"]  # likewise
        method = {
            "name": self.method.name,
            "retention_ratio": self.method.retention_ratio,
            # as built: a default left unstated is named, and one spelled out is the same cell
            "params": {k: v for k, v in self.method.built.params().items() if k != "retention_ratio"},
        }
        benchmark = {
            k: v for k, v in asdict(self.benchmark).items() if k not in ("name", "dataset_commits")
        }  # the commits are the data's, under identity["data"]
        benchmark["tasks"], benchmark["columns"] = list(self.benchmark.tasks), list(self.benchmark.columns)
        for group, values in (("model", model), ("method", method), ("benchmark", benchmark)):
            identity[group] = {**identity.get(group, {}), **values}
        if self.launcher.num_processes > 1 and (
            (self.benchmark.batch_size > 1 and not self.model.batch_invariant) or self.benchmark.may_sample()
        ):
            # each process batches its own share of the documents, and a batch's other rows change a row's
            # answer where kernels depend on the batch's shape (bf16 on a GPU; README, "Batching"); and when
            # sampling, each rank starts from the same seed, so a document's draw depends on which documents
            # its rank sampled before it
            identity["launcher"] = {"num_processes": self.launcher.num_processes}
        for unread in ("lite", "lite_tasks"):  # they chose benchmark.tasks, which is in the identity
            identity["benchmark"].pop(unread, None)
        identity["data"] = data_identity(list(self.benchmark.tasks))
        identity["task_definitions"] = task_identity(list(self.benchmark.tasks))
        identity["weights"] = checkpoint_identity(
            self.model.pretrained, random_init=self.model.random_init, revision=self.model.revision
        )
        if "files" in (identity["weights"] or {}):  # a folder: its files name what loaded, not its path
            identity["model"].pop("pretrained", None)
        identity["identity_version"] = IDENTITY_VERSION
        return identity

    def check_environment(self, memo: dict[Any, Any] | None = None, *, runs_here: bool = True) -> None:
        """Checks that touch the disk (tasks and their data, the checkpoint, the device, the compile
        backend); still loads no weight. One error lists every problem. ``memo``: shared by the cells of a
        sweep, so that each benchmark's tasks and each model are checked once. ``runs_here=False``: the cell
        will run on another machine (a Slurm job), so this one's devices and compile backend are not
        checked (:func:`~globalcom2.run_spec.run_problems`)."""
        from globalcom2.lmms.preflight import PreflightError, check_tasks

        memo = {} if memo is None else memo
        tasks_key = ("tasks", self.benchmark.tasks)
        if tasks_key not in memo:
            try:
                check_tasks(list(self.benchmark.tasks))
                memo[tasks_key] = None
            except PreflightError as err:
                memo[tasks_key] = err
        if memo[tasks_key] is not None:
            raise memo[tasks_key]
        problems = run_problems(
            self.run_spec(),
            num_processes=self.launcher.num_processes,
            keys=HYDRA_KEYS,
            memo=memo,
            runs_here=runs_here,
        )
        if problems:
            kind = (
                FileNotFoundError if any(isinstance(p, FileNotFoundError) for p in problems) else ValueError
            )
            raise kind("; ".join(str(p) for p in problems))


def check_keys(plain: dict[str, Any]) -> None:
    """Refuse a key no reader reads (a typo such as ``+benchmark.limt=3`` would otherwise do nothing)."""
    for group, known in GROUP_KEYS.items():
        node = plain if group is None else plain.get(group)
        if not isinstance(node, dict):
            continue
        unknown = sorted(set(node) - known)
        if unknown:
            where = "" if group is None else f"{group}."
            raise ValueError(
                f"unknown config key {', '.join(where + k for k in unknown)}; the {group or 'top-level'} keys "
                f"are {', '.join(sorted(known))} (an override of any other key would do nothing)"
            )


#: ``model.device`` values a multi-process cell takes: the ranks' own GPUs (``cuda``, or unset) or the CPU.
MULTI_PROCESS_DEVICES = ("cuda", "cpu", None)


def _launcher(launcher_cfg: dict[str, Any]) -> LauncherSpec:
    launcher = LauncherSpec(
        name=launcher_cfg["name"],
        num_processes=config_int(launcher_cfg.get("num_processes", 1), "launcher.num_processes", minimum=1),
        tool=str(launcher_cfg.get("tool", "auto")),
    )
    if launcher.tool not in LAUNCH_TOOLS:
        raise ValueError(f"launcher.tool={launcher.tool!r}; valid: {', '.join(LAUNCH_TOOLS)}")
    if launcher.name == "local" and launcher.num_processes != 1:
        raise ValueError(
            f"launcher=local runs a cell in this process, so launcher.num_processes must be 1, got "
            f"{launcher.num_processes}; for data parallelism use launcher=accelerate "
            f"launcher.num_processes={launcher.num_processes}"
        )
    return launcher


def config_int(value: Any, key: str, *, minimum: int, meaning: str = "") -> int:
    """``value`` as an int >= ``minimum``, or ``ValueError`` naming the key, the value and what is valid.

    Floats are refused, not truncated (``limit=2.7`` is an error, not 2); so are booleans.
    """
    valid = f"an integer >= {minimum}" + (f" ({meaning})" if meaning else "")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be {valid}, got {value!r}")
    return value


def _gen_kwargs(value: Any) -> str | None:
    """``benchmark.gen_kwargs`` (a mapping, a JSON object or ``k=v,k=v``) as one canonical ``k=v`` string, keys
    sorted and numbers typed by key (:func:`canonical_gen_kwargs`: ``max_new_tokens=16.0`` is ``16``,
    ``temperature=0`` is ``0.0``): what lmms-eval's ``gen_kwargs`` takes, and one identity for one set of settings. The settings
    are checked here, before any weight loads."""
    settings = parse_overrides(value, "benchmark.gen_kwargs")
    if not settings:
        return None
    try:
        GenerationSettings.from_gen_kwargs(settings, 1)
        settings = canonical_gen_kwargs(settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"benchmark.gen_kwargs={value!r}: {err}") from None
    return format_gen_kwargs(settings, "benchmark.gen_kwargs")


def _check_columns(columns: tuple[str, ...], tasks: tuple[str, ...]) -> None:
    """Each paper-table column must be one of :data:`PAPER_METRICS` and computed from tasks the cell runs:
    a bad one would otherwise surface only after the whole evaluation, whose generations are then lost."""
    from globalcom2.data.benchmarks import PAPER_METRICS

    for column in columns:
        if column not in PAPER_METRICS:
            raise ValueError(
                f"benchmark.columns: unknown column {column!r}; valid: {', '.join(PAPER_METRICS)}"
            )
        missing = [task for task in PAPER_METRICS[column].tasks if task not in tasks]
        if missing:
            raise ValueError(
                f"benchmark.columns: {column!r} is computed from task(s) {', '.join(missing)}, which "
                f"benchmark.tasks ({', '.join(tasks)}) does not run"
            )


def _task_list(value: Any, key: str) -> tuple[str, ...]:
    """Task names: a list of strings (one string is one task), or ``ValueError`` naming the key."""
    if value == "???" or value is None:
        raise ValueError(f"{key} is not set: choose a benchmark (e.g. benchmark=demo) or list tasks=[...]")
    tasks = [value] if isinstance(value, str) else value
    if not isinstance(tasks, (list, tuple)) or not all(
        isinstance(t, str) and t and t != "???" for t in tasks
    ):
        raise ValueError(f"{key} must be a list of task names, e.g. [globalcom2_demo], got {value!r}")
    return tuple(tasks)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict from an OmegaConf config (or a dict)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
