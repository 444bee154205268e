"""A cell of the evaluation grid (model x method x retention ratio x benchmark), checked before anything loads.

:func:`CellSpec.from_config` turns a composed Hydra config into plain, validated values. Everything that
can be wrong with a cell (an unknown method or parameter, a ratio outside (0, 1], a malformed limit, batch
size or seed, an unknown task, missing offline data, a checkpoint that is not on disk while offline or is
not LLaVA-NeXT AnyRes, a layer index past the model's depth, a device this machine lacks) fails here, with
a message that names the value and what is valid, before a weight or dataset is loaded.

:meth:`CellSpec.identity` is what the results store keys a finished cell on (``globalcom2/store.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from globalcom2.budget import validate_retention_ratio, warn_if_no_patch_token_kept
from globalcom2.lmms.generation import parse_gen_kwargs
from globalcom2.lmms.method_args import (
    check_attn_compatibility,
    coerce_method_params,
    parse_attn_implementation,
)
from globalcom2.lmms.preflight import data_identity
from globalcom2.lmms.protocols import (
    DEFAULT_PROTOCOL,
    budget_method_params,
    check_protocol,
    check_tasks_covered,
)
from globalcom2.methods import METHODS, CompressionMethod
from globalcom2.models.base import DTYPE_CHOICES
from globalcom2.models.compiled import compile_problem, resolve_compile
from globalcom2.models.preload import model_problems
from globalcom2.store import CellKey

LAUNCH_TOOLS = ("auto", "accelerate", "torchrun")
#: Bump when a code change alters the results of unchanged configs (a prompt, a task's scoring), so that
#: cells finished before it are run again instead of being reused. The git SHA is recorded, not hashed:
#: a commit that changes nothing a cell computes must not re-run the grid.
IDENTITY_VERSION = 2  # 2: under protocol=llava, chunked tokenisation and FastV/SparseVLM budgets in patches
#: Config keys that cannot change a cell's result, left out of its identity: where files go (``paths``),
#: how it is launched (N processes give the answers of one, tests/harness/test_run_cells.py), where it
#: is logged, run switches, and the names that already form the cell's folder.
NOT_IDENTITY = (
    "experiment_name",
    "force",
    "dry_run",
    "paths",
    "launcher",
    "logger",
    "hydra",
    "model.name",
    "method.label",
    "benchmark.name",
    "compile",  # in the identity as model.compile, and only when on (cells from before it keep their identity)
)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # results folder name
    pretrained: str
    random_init: bool
    dtype: str
    device: str
    attn_implementation: Any
    compile: str | None = None  # a torch.compile mode (globalcom2.models.compiled), None: eager


@dataclass(frozen=True)
class MethodSpec:
    name: str  # registry name
    label: str  # results folder name (distinguishes ablation variants)
    retention_ratio: float
    params: dict[str, Any] = field(default_factory=dict)

    def attach_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``attach``/the plugin (vanilla takes no budget)."""
        ratio = {} if self.name == "vanilla" else {"retention_ratio": self.retention_ratio}
        return {**ratio, **self.params}

    @cached_property
    def built(self) -> CompressionMethod:
        """The method, built once per spec: validates out-of-range values without a model, and is what the
        model check (:func:`check_model`) tests against the checkpoint's config. Not a field, so neither
        the spec's equality nor its dict form sees it."""
        return METHODS.create(self.name, **self.attach_kwargs())


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # results folder name
    tasks: tuple[str, ...]
    columns: tuple[str, ...]  # paper-table columns (PAPER_METRICS keys) this benchmark fills
    limit: int | None
    batch_size: int
    gen_kwargs: str | None
    protocol: str = DEFAULT_PROTOCOL  # lmms_eval | llava (globalcom2.lmms.protocols)

    def generation_overrides(self) -> dict[str, Any] | None:
        """Under ``llava``, ``gen_kwargs`` adjusts LLaVA's fixed settings in the plugin (lmms-eval gets none)."""
        if self.protocol != "llava" or not self.gen_kwargs:
            return None
        return parse_gen_kwargs(self.gen_kwargs, "benchmark.gen_kwargs")


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

    @property
    def key(self) -> CellKey:
        return CellKey(
            self.experiment,
            self.model.name,
            self.method.label,
            self.method.retention_ratio,
            self.benchmark.name,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellSpec:
        return cls(
            experiment=data["experiment"],
            seed=data["seed"],
            model=ModelSpec(**data["model"]),
            method=MethodSpec(**data["method"]),
            benchmark=BenchmarkSpec(
                **{
                    **data["benchmark"],
                    "tasks": tuple(data["benchmark"]["tasks"]),
                    "columns": tuple(data["benchmark"]["columns"]),
                }
            ),
            launcher=LauncherSpec(**data["launcher"]),
        )

    @classmethod
    def from_config(cls, cfg: Any) -> CellSpec:
        """Validated spec of the cell a composed config describes (nothing is loaded).

        Raises ``ValueError``/``TypeError`` naming the bad key, its value and what is valid.
        """
        plain = _to_plain(cfg)
        method_cfg, bench_cfg = plain["method"], plain["benchmark"]
        name = method_cfg["name"]
        protocol = check_protocol(bench_cfg.get("protocol", DEFAULT_PROTOCOL))
        # The protocol's budget basis, written into the params so that an explicit `budget_basis: patches`
        # under llava and the implicit one are one identity (and a contradicting one fails here).
        params = budget_method_params(
            protocol, name, coerce_method_params(name, dict(method_cfg.get("params") or {}))
        )  # unknown parameters raise
        # Vanilla keeps everything: every ratio of a sweep resolves to its single r1.0 cell.
        ratio = (
            1.0
            if name == "vanilla"
            else validate_retention_ratio(method_cfg["retention_ratio"], name="method.retention_ratio")
        )
        method = MethodSpec(
            name=name, label=method_cfg.get("label") or name, retention_ratio=ratio, params=params
        )
        method.built  # noqa: B018  (out-of-range values raise here, without a model)
        warn_if_no_patch_token_kept(ratio)

        model_cfg = plain["model"]
        attn = parse_attn_implementation(model_cfg.get("attn_implementation", "sdpa"))
        check_attn_compatibility(name, attn)
        dtype = str(model_cfg.get("dtype", "auto"))
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"model.dtype={dtype!r} is not a dtype; valid: {', '.join(DTYPE_CHOICES)}")
        device = str(model_cfg.get("device", "cpu"))
        model = ModelSpec(
            name=model_cfg["name"],
            pretrained=str(model_cfg["pretrained"]),
            random_init=_flag(model_cfg.get("random_init", False), "model.random_init"),
            dtype=dtype,
            device=device,
            attn_implementation=attn,
            compile=resolve_compile(plain.get("compile", False), device),
        )
        bench_name, tasks = bench_cfg["name"], tuple(bench_cfg["tasks"])
        columns = tuple(bench_cfg.get("columns") or ())
        if _flag(bench_cfg.get("lite", False), "benchmark.lite"):
            tasks = tuple(bench_cfg.get("lite_tasks") or ())
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
        benchmark = BenchmarkSpec(
            name=bench_name,
            tasks=tasks,
            columns=columns,
            limit=limit,
            batch_size=config_int(bench_cfg.get("batch_size", 1), "benchmark.batch_size", minimum=1),
            gen_kwargs=bench_cfg.get("gen_kwargs"),
            protocol=protocol,
        )
        if benchmark.gen_kwargs:
            parse_gen_kwargs(str(benchmark.gen_kwargs), "benchmark.gen_kwargs")  # before any weight loads
        check_tasks_covered(benchmark.protocol, benchmark.tasks)
        launcher_cfg = plain["launcher"]
        launcher = LauncherSpec(
            name=launcher_cfg["name"],
            num_processes=config_int(
                launcher_cfg.get("num_processes", 1), "launcher.num_processes", minimum=1
            ),
            tool=str(launcher_cfg.get("tool", "auto")),
        )
        if launcher.tool not in LAUNCH_TOOLS:
            raise ValueError(f"launcher.tool={launcher.tool!r}; valid: {', '.join(LAUNCH_TOOLS)}")
        seed = config_int(plain.get("seed", 0), "seed", minimum=0)
        return cls(plain["experiment_name"], seed, model, method, benchmark, launcher)

    def identity(self, cfg: Any) -> dict[str, Any]:
        """Everything that can change this cell's result: the resolved config less :data:`NOT_IDENTITY`,
        with the values this spec normalised (vanilla's ratio, typed method parameters, ints, the lite task
        list) in place of the raw ones, so that equivalent configs give one identity; plus the data each
        task reads (``preflight.data_identity``) and :data:`IDENTITY_VERSION`."""
        identity = _to_plain(cfg)
        for dotted in NOT_IDENTITY:
            parent, _, leaf = dotted.rpartition(".")
            node = identity.get(parent, {}) if parent else identity
            if isinstance(node, dict):
                node.pop(leaf, None)
        identity["seed"] = self.seed
        model = {k: v for k, v in asdict(self.model).items() if k != "name"}
        if model["compile"] is None:
            del model["compile"]  # eager, as every cell before compile mode existed: the same identity
        method = {k: v for k, v in asdict(self.method).items() if k != "label"}
        benchmark = {k: v for k, v in asdict(self.benchmark).items() if k != "name"}
        benchmark["tasks"], benchmark["columns"] = list(self.benchmark.tasks), list(self.benchmark.columns)
        for group, values in (("model", model), ("method", method), ("benchmark", benchmark)):
            identity[group] = {**identity.get(group, {}), **values}
        identity["data"] = data_identity(list(self.benchmark.tasks))
        identity["identity_version"] = IDENTITY_VERSION
        return identity

    def preflight(self) -> None:
        """Checks that touch the disk (tasks and their data, the checkpoint's config, the device); still
        loads no weight."""
        from globalcom2.lmms.api import preflight

        preflight(list(self.benchmark.tasks))
        check_model(self)


def check_model(spec: CellSpec) -> None:
    """:func:`globalcom2.models.preload.model_problems` for this cell, raised as one error listing every
    problem (``FileNotFoundError`` when the checkpoint cannot be found, else ``ValueError``)."""
    problems = model_problems(
        spec.model.pretrained,
        random_init=spec.model.random_init,
        device=spec.model.device,
        method=spec.method.built,
        num_processes=spec.launcher.num_processes,
    )
    if spec.model.compile is not None:
        problem = compile_problem(spec.model.device, spec.model.compile)
        if problem:
            problems.append(RuntimeError(f"compile={spec.model.compile}: {problem}"))
    if problems:
        kind = FileNotFoundError if any(isinstance(p, FileNotFoundError) for p in problems) else ValueError
        raise kind("; ".join(str(p) for p in problems))


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
