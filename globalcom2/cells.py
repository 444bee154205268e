"""A cell of the evaluation grid (model x method x retention ratio x benchmark), checked before anything loads.

:func:`CellSpec.from_config` turns a composed Hydra config into plain, validated values. Everything that
can be wrong with a cell (an unknown method or parameter, a ratio outside (0, 1], an unknown task, missing
offline data, a checkpoint that is not on disk while offline) fails here, with a message that says how to
fix it, before a model or dataset is loaded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from globalcom2.budget import validate_retention_ratio
from globalcom2.evaluation.method_args import (
    check_attn_compatibility,
    coerce_method_params,
    parse_attn_implementation,
)
from globalcom2.methods import METHODS
from globalcom2.store import CellKey


@dataclass(frozen=True)
class ModelSpec:
    name: str  # results folder name
    pretrained: str
    random_init: bool
    dtype: str
    device: str
    attn_implementation: Any


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


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # results folder name
    tasks: tuple[str, ...]
    columns: tuple[str, ...]  # paper-table columns (PAPER_METRICS keys) this benchmark fills
    limit: int | None
    batch_size: int
    gen_kwargs: str | None


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
        """Validated spec of the cell a composed config describes (nothing is loaded)."""
        plain = _to_plain(cfg)
        method_cfg = plain["method"]
        name = method_cfg["name"]
        params = coerce_method_params(name, dict(method_cfg.get("params") or {}))  # unknown ones raise
        # Vanilla keeps everything: every ratio of a sweep resolves to its single r1.0 cell.
        ratio = 1.0 if name == "vanilla" else validate_retention_ratio(method_cfg["retention_ratio"])
        method = MethodSpec(
            name=name, label=method_cfg.get("label") or name, retention_ratio=ratio, params=params
        )
        METHODS.create(name, **method.attach_kwargs())  # out-of-range values raise here, without a model

        model_cfg = plain["model"]
        attn = parse_attn_implementation(model_cfg.get("attn_implementation", "sdpa"))
        check_attn_compatibility(name, attn)
        model = ModelSpec(
            name=model_cfg["name"],
            pretrained=str(model_cfg["pretrained"]),
            random_init=bool(model_cfg.get("random_init", False)),
            dtype=str(model_cfg.get("dtype", "auto")),
            device=str(model_cfg.get("device", "cpu")),
            attn_implementation=attn,
        )
        bench_cfg = plain["benchmark"]
        bench_name, tasks = bench_cfg["name"], tuple(bench_cfg["tasks"])
        columns = tuple(bench_cfg.get("columns") or ())
        if bench_cfg.get("lite"):
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
        batch_size = int(bench_cfg.get("batch_size", 1))
        if (limit is not None and int(limit) < 1) or batch_size < 1:
            raise ValueError(
                f"benchmark.limit must be >= 1 or null and batch_size >= 1, got {limit!r}, {batch_size!r}"
            )
        benchmark = BenchmarkSpec(
            name=bench_name,
            tasks=tasks,
            columns=columns,
            limit=None if limit is None else int(limit),
            batch_size=batch_size,
            gen_kwargs=bench_cfg.get("gen_kwargs"),
        )
        launcher_cfg = plain["launcher"]
        launcher = LauncherSpec(
            name=launcher_cfg["name"],
            num_processes=int(launcher_cfg.get("num_processes", 1)),
            tool=str(launcher_cfg.get("tool", "auto")),
        )
        if launcher.num_processes < 1:
            raise ValueError(f"launcher.num_processes must be >= 1, got {launcher.num_processes}")
        return cls(plain["experiment_name"], int(plain.get("seed", 0)), model, method, benchmark, launcher)

    def preflight(self) -> None:
        """Checks that touch the disk (tasks and their data, the checkpoint); still loads nothing."""
        from globalcom2.evaluation.api import preflight

        preflight(list(self.benchmark.tasks))
        check_checkpoint(self.model)


def check_checkpoint(model: ModelSpec) -> None:
    """Raise unless the weights can be loaded: a local folder, the tiny model, random init, or a hub id that
    is in the local cache (when offline) or downloadable (when online)."""
    name = model.pretrained
    if model.random_init or name == "tiny" or name.startswith("tiny:"):
        return
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise FileNotFoundError(f"checkpoint folder {name!r} has no config.json")
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise FileNotFoundError(
                f"checkpoint {name!r} is not in the local Hugging Face cache and the hub is offline. Download it "
                f"first (`hf download {name}` with network access), point model.pretrained at a local folder, or "
                "set model.random_init=true to measure speed and memory with random weights."
            )


def _to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict from an OmegaConf config (or a dict)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
