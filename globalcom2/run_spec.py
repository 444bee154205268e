"""One front door for what an evaluation runs: the model, the built method, the plugin's options, the protocol.

Two spellings reach it. A composed Hydra config (``globalcom2.run`` -> ``globalcom2.cells.CellSpec``) nests the
values in groups (``model.dtype``, ``method.retention_ratio``, ``benchmark.batch_size``); an lmms-eval
``model_args`` string (``--model_args pretrained=...,method=random,retention_ratio=0.25``, read by the
plugin's ``create_from_arg_string`` and by the pre-flight of ``python -m globalcom2.lmms``) is flat. Both are
mapped, by name only, onto the keyword arguments of :func:`parse_run`, which checks every value once and
returns a :class:`RunSpec` holding the already-built :class:`~globalcom2.methods.CompressionMethod`. The
plugin takes that spec and checks nothing again; a value that is wrong is refused in the same words on every
entry point, naming the key as that entry point spells it (:data:`HYDRA_KEYS`).

What needs the disk or the machine (the checkpoint's config and weights, the device, the compile backend) is
checked by :func:`run_problems`, and the tasks and their data by the task pre-flight
(``globalcom2.lmms.preflight``), still before any weight loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Literal

import torch

from globalcom2.budget import validate_retention_ratio
from globalcom2.methods import METHODS, CompressionMethod
from globalcom2.methods.params import (
    budget_kwargs,
    check_attn_compatibility,
    coerce,
    coerce_method_params,
    parse_attn_implementation,
)
from globalcom2.models.base import DTYPE_CHOICES
from globalcom2.models.compiled import COMPILE_MODES, CUDA_GRAPH_MODES, compile_problem, resolve_compile
from globalcom2.models.preload import check_revision, checkpoint_config, model_problems
from globalcom2.protocol.generation import GenerationSettings, parse_gen_kwargs, parse_key_values
from globalcom2.protocol.rules import DEFAULT_PROTOCOL, budget_method_params, check_protocol

#: How Hydra spells each key of :func:`parse_run` (``model_args`` spells them as the parameter names).
HYDRA_KEYS: dict[str, str] = {
    "pretrained": "model.pretrained",
    "method": "method.name",
    "retention_ratio": "method.retention_ratio",
    "dtype": "model.dtype",
    "device": "model.device",
    "attn_implementation": "model.attn_implementation",
    "random_init": "model.random_init",
    "vicuna_text": "model.vicuna_text",
    "revision": "model.revision",
    "compile": "compile",
    "batch_invariant": "batch_invariant",
    "prefetch": "prefetch",
    "prefetch_threads": "prefetch_threads",
    "input_cache_gib": "input_cache_gib",
    "batch_size": "benchmark.batch_size",
    "protocol": "benchmark.protocol",
    "generation_overrides": "benchmark.gen_kwargs",
    "method_params": "method.params.",  # a prefix: method.params.<name>
}


@dataclass(frozen=True)
class ModelSpec:
    """The checkpoint and how it runs. ``name`` is the results folder name (Hydra; empty from ``model_args``)."""

    name: str
    pretrained: str
    random_init: bool
    dtype: str
    device: str | None  # None: chosen by the plugin (the process's accelerator, else CUDA if present)
    attn_implementation: Any  # a string, or a mapping per sub-config
    compile: str | None = None  # a torch.compile mode (globalcom2.models.compiled); None: eager
    # Every row's numbers independent of its batch (globalcom2.models.batch_invariant); other numbers than off.
    batch_invariant: bool = False
    # A hub id's branch, tag or commit (None: main). A cell's identity names the commit it resolves to, and
    # globalcom2.run pins this field to that commit before anything loads (CellSpec.pinned).
    revision: str | None = None
    # random_init only: each prompt's text cut to the token count Vicuna's tokenizer gives it
    # (globalcom2.protocol.vicuna_length), where the byte-level tokenizer gives about four times as many.
    vicuna_text: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """The method as a cell names it; ``params`` are typed, and include the protocol's budget basis."""

    name: str  # registry name
    label: str  # results folder name (distinguishes ablation variants)
    retention_ratio: float
    params: dict[str, Any] = field(default_factory=dict)

    def attach_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``METHODS.create``/``attach`` (a method without a budget takes no ratio)."""
        return {**budget_kwargs(self.name, self.retention_ratio), **self.params}

    @cached_property
    def built(self) -> CompressionMethod:
        """The method, built once: what the model check tests against the checkpoint's config and what the
        plugin attaches. Not a field, so neither equality nor the dict form sees it."""
        return METHODS.create(self.name, **self.attach_kwargs())


@dataclass(frozen=True)
class RunOptions:
    """How the plugin runs the model (everything of ``model_args`` that is neither model nor method)."""

    batch_size: int = 1
    max_new_tokens: int = 1024  # when a task sets none
    warmup: int = 1  # untimed generate calls before the first timed one
    profile: bool = True
    protocol: str = DEFAULT_PROTOCOL
    generation_overrides: dict[str, Any] | None = None  # on top of LLaVA's settings, under protocol=llava
    records_path: str | None = None
    # A folder that keeps each finished batch's answers as it finishes, so that an interrupted run resumes
    # there (globalcom2/answer_journal.py). A cell gives its own (globalcom2.store.Cell.answers_dir).
    answers_journal: str | None = None
    # Empty an answers journal written under other settings (a code change since the interruption) instead of
    # refusing it: for a folder the caller owns, such as a cell's.
    discard_stale_answers: bool = False
    # Prepare the next batch in a background thread while this one generates (globalcom2/lmms/batch_pipeline.py).
    # None (auto): on when the model runs on CUDA. On a CPU the thread competes with the model for the cores.
    prefetch: bool | None = None
    # While prefetching, the threads that run the processor side by side (None: auto, default_prefetch_threads).
    prefetch_threads: int | None = None
    # GiB of encoded inputs this process keeps for its later runs, which read an identical batch back instead of
    # running the processor again (globalcom2/lmms/input_cache.py); 0: off.
    input_cache_gib: float = 0.0


@dataclass(frozen=True)
class RunSpec:
    """What one evaluation runs, parsed and validated (:func:`parse_run`)."""

    model: ModelSpec
    method: MethodSpec
    options: RunOptions

    @classmethod
    def from_model_args(cls, args: Mapping[str, Any]) -> RunSpec:
        """The spec of an lmms-eval ``model_args`` mapping: the plugin's keys (:data:`MODEL_ARG_KEYS`), every
        other key a parameter of the method (converted to the type its ``__init__`` declares)."""
        own = {k: v for k, v in args.items() if k in MODEL_ARG_KEYS}
        if own.pop("max_batch_size", None) is not None:
            raise ValueError(
                "max_batch_size: automatic batch sizes are not supported; pass an integer batch_size >= 1"
            )
        if not own.get("pretrained"):
            raise ValueError("model_args needs pretrained=<hub id | folder | tiny>")
        params = {k: v for k, v in args.items() if k not in MODEL_ARG_KEYS}
        # one run, not a sweep: a ratio for a method that takes none (vanilla) is a mistake, not a grid point
        return parse_run(**own, method_params=params, ratio_without_budget="refuse")


#: The ``model_args`` keys that are the plugin's own (all others are method parameters).
MODEL_ARG_KEYS = frozenset(
    {
        "pretrained",
        "method",
        "retention_ratio",
        "dtype",
        "device",
        "attn_implementation",
        "random_init",
        "vicuna_text",
        "revision",
        "compile",
        "batch_invariant",
        *(f.name for f in fields(RunOptions)),
        "max_batch_size",
    }
)


#: ``model_args`` values kept as written: names, where ``revision=0123456`` must not become ``123456``.
RAW_MODEL_ARGS = frozenset({"pretrained", "revision", "records_path", "answers_journal"})


def parse_model_args(text: str) -> dict[str, Any]:
    """lmms-eval's ``--model_args`` string (``k=v,k=v``) as a mapping (:func:`parse_key_values`).

    Raises:
        ValueError: a malformed entry, named, with the form expected.
    """
    try:
        return parse_key_values(text, raw_keys=RAW_MODEL_ARGS)
    except ValueError as err:
        raise ValueError(
            f"model_args: {err}; model_args is 'key=value,key=value', e.g. "
            "pretrained=tiny,method=random,retention_ratio=0.25"
        ) from None


def parse_run(
    *,
    pretrained: Any,
    method: Any = "vanilla",
    retention_ratio: Any = None,
    method_params: Mapping[str, Any] | None = None,
    dtype: Any = "auto",
    device: Any = None,
    attn_implementation: Any = "sdpa",
    random_init: Any = False,
    vicuna_text: Any = False,
    revision: Any = None,
    compile: Any = False,
    batch_invariant: Any = False,
    batch_size: Any = 1,
    max_new_tokens: Any = 1024,
    warmup: Any = 1,
    profile: Any = True,
    protocol: Any = DEFAULT_PROTOCOL,
    generation_overrides: Any = None,
    records_path: Any = None,
    answers_journal: Any = None,
    discard_stale_answers: Any = False,
    prefetch: Any = "auto",
    prefetch_threads: Any = "auto",
    input_cache_gib: Any = 0,
    model_name: str = "",
    method_label: str | None = None,
    keys: Mapping[str, str] | None = None,
    ratio_without_budget: Literal["ignore", "refuse"] = "ignore",
) -> RunSpec:
    """Check every value once and build the spec (the method included). Nothing touches the disk.

    Args:
        keys: how the caller spells each key in messages (:data:`HYDRA_KEYS`); default: the parameter name.
        ratio_without_budget: what a ratio other than 1 means for a method that takes none (``vanilla``):
            ``"ignore"`` in a sweep (every ratio of it is vanilla's one r1.0 cell), ``"refuse"`` for one run.

    Raises:
        ValueError/TypeError: the first bad value, named as the caller spells it, with what is valid.
    """
    keys = keys or {}

    def key(name: str) -> str:
        return keys.get(name, name)

    def integer(value: Any, name: str, minimum: int) -> int:
        if value == "auto":
            raise ValueError(
                f"{key(name)}=auto: automatic batch sizes are not supported; give an integer >= {minimum}"
            )
        if isinstance(value, bool | float):  # 2.0 is refused, not truncated, as every integer setting is
            raise ValueError(f"{key(name)} must be an integer >= {minimum}, got {value!r}")
        try:
            number = coerce(value, int, key(name))
        except ValueError:
            raise ValueError(f"{key(name)} must be an integer >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"{key(name)} must be an integer >= {minimum}, got {number!r}")
        return number

    if pretrained is None or str(pretrained) in ("", "???"):
        raise ValueError(
            f"{key('pretrained')} is not set: give a hub id, a checkpoint folder, tiny or tiny-trained"
        )
    protocol = check_protocol(protocol)
    name = str(method)
    budgeted = METHODS.get(name).has_budget  # an unknown method lists the registered ones
    if retention_ratio is None:
        if budgeted:
            raise ValueError(f"method {name!r} needs {key('retention_ratio')} (the kept fraction, in (0, 1])")
        ratio = 1.0
    else:
        ratio = validate_retention_ratio(
            coerce(retention_ratio, float, key("retention_ratio")), name=key("retention_ratio")
        )
        if not budgeted:
            if ratio != 1.0 and ratio_without_budget == "refuse":
                raise ValueError(
                    f"method {name!r} keeps every token, so {key('retention_ratio')} must be 1.0 or absent, got "
                    f"{retention_ratio!r}; use {', '.join(n for n in METHODS.names() if METHODS.get(n).has_budget)} "
                    "to compress"
                )
            ratio = 1.0  # no budget (vanilla): every ratio of a sweep is its one r1.0 cell
    prefix = keys.get("method_params", "")  # "method.params." in Hydra, nothing in model_args
    params = coerce_method_params(name, dict(method_params or {}), spell=lambda param: prefix + param)
    params = budget_method_params(protocol, name, params)
    method_spec = MethodSpec(name=name, label=method_label or name, retention_ratio=ratio, params=params)
    try:
        method_spec.built  # noqa: B018  (out-of-range parameters raise here, without a model)
    except (TypeError, ValueError) as err:
        raise type(err)(f"method {name!r}: {err}") from None
    attn = parse_attn_implementation(attn_implementation)
    check_attn_compatibility(name, attn)

    dtype = str(dtype)
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"{key('dtype')}={dtype!r} is not a dtype; valid: {', '.join(DTYPE_CHOICES)}")
    device = None if device is None else str(device)
    compile_value = _compile_setting(compile, key("compile"))
    invariant = coerce(batch_invariant, bool, key("batch_invariant"))
    if invariant:
        _check_batch_invariant(compile_value, attn, key)
    random_init = coerce(random_init, bool, key("random_init"))
    vicuna_text = coerce(vicuna_text, bool, key("vicuna_text"))
    if vicuna_text and not random_init:
        raise ValueError(
            f"{key('vicuna_text')}=true needs {key('random_init')}=true: it cuts the byte-level tokenizer's text "
            "of a random-initialised model to Vicuna's token count, and a checkpoint's own tokenizer already "
            "gives that count"
        )
    if revision is not None and not isinstance(revision, str):  # Hydra reads 1.10 as 1.1, true as a boolean
        raise ValueError(
            f"{key('revision')}={revision!r} was read as a {type(revision).__name__}, which may not be the "
            f"revision meant (1.10 reads as 1.1); quote it, e.g. {key('revision')}='\"v1.10\"', or give the "
            "full 40-character commit"
        )
    check_revision(str(pretrained), revision, random_init=random_init, keys=keys)
    model = ModelSpec(
        name=model_name,
        pretrained=str(pretrained),
        random_init=random_init,
        dtype=dtype,
        device=device,
        attn_implementation=attn,
        compile=resolve_compile(compile_value),
        batch_invariant=invariant,
        revision=revision,
        vicuna_text=vicuna_text,
    )
    overrides = parse_overrides(generation_overrides, key("generation_overrides"))
    if overrides and protocol != "llava":
        raise ValueError(
            "generation_overrides apply under protocol=llava (whose generation settings are fixed); under "
            "protocol=lmms_eval pass lmms-eval's --gen_kwargs instead"
        )
    options = RunOptions(
        batch_size=integer(batch_size, "batch_size", 1),
        max_new_tokens=integer(max_new_tokens, "max_new_tokens", 1),
        warmup=integer(warmup, "warmup", 0),
        profile=coerce(profile, bool, key("profile")),
        protocol=protocol,
        generation_overrides=overrides,
        records_path=None if records_path is None else str(records_path),
        answers_journal=None if answers_journal in (None, "") else str(answers_journal),
        discard_stale_answers=coerce(discard_stale_answers, bool, key("discard_stale_answers")),
        prefetch=_prefetch_setting(prefetch, key("prefetch")),
        prefetch_threads=prefetch_threads_setting(prefetch_threads, key("prefetch_threads")),
        input_cache_gib=input_cache_setting(input_cache_gib, key("input_cache_gib")),
    )
    if options.prefetch is False and options.prefetch_threads is not None:
        raise ValueError(
            f"{key('prefetch_threads')}={options.prefetch_threads} needs prefetching, but {key('prefetch')}=false "
            f"prepares each batch in turn; drop {key('prefetch_threads')} or set {key('prefetch')} to true or auto"
        )
    if overrides:
        GenerationSettings.from_gen_kwargs(overrides, options.max_new_tokens)
    return RunSpec(model=model, method=method_spec, options=options)


def prefetch_threads_setting(value: Any, name: str) -> int | None:
    """``auto`` (``None``: :func:`default_prefetch_threads`) or an integer in [1, :data:`MAX_PREFETCH_THREADS`];
    ``ValueError`` naming ``name``, the value and what is valid (``globalcom2.perf.throughput`` reads its
    ``--prefetch-threads`` with it too)."""
    if value is None or value == "auto":
        return None
    message = f"{name} must be auto or an integer from 1 to {MAX_PREFETCH_THREADS}, got {value!r}"
    if isinstance(value, bool | float):  # 2.0 is refused, not truncated, as every integer setting is
        raise ValueError(message)
    try:
        number = coerce(value, int, name)
    except ValueError:
        raise ValueError(message) from None
    if not 1 <= number <= MAX_PREFETCH_THREADS:
        raise ValueError(message)
    return number


#: The largest ``input_cache_gib`` accepted: a guard against a unit slip (bytes given as GiB).
MAX_INPUT_CACHE_GIB = 1024.0
#: The smallest one besides 0, about 10.7 MB: one 672x672 image's encoded inputs take 6.8 MB in fp32 (five
#: 336x336 views), so a smaller budget would keep next to nothing and only pay the digests.
MIN_INPUT_CACHE_GIB = 0.01


def input_cache_setting(value: Any, name: str) -> float:
    """``input_cache_gib`` (``globalcom2.lmms.input_cache``): 0 (off) or a size in GiB from
    :data:`MIN_INPUT_CACHE_GIB` to :data:`MAX_INPUT_CACHE_GIB`.

    Raises:
        ValueError: anything else (a boolean, a word, a negative or non-finite number), naming ``name``, the
            value and what is valid.
    """
    message = (
        f"{name} must be 0 (off) or a size in GiB in [{MIN_INPUT_CACHE_GIB:g}, {MAX_INPUT_CACHE_GIB:g}], "
        f"got {value!r}"
    )
    if value is None or isinstance(value, bool):
        raise ValueError(message)
    try:
        size = coerce(value, float, name)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (size == 0.0 or MIN_INPUT_CACHE_GIB <= size <= MAX_INPUT_CACHE_GIB):  # NaN fails every comparison
        raise ValueError(message)
    return size


def _prefetch_setting(value: Any, name: str) -> bool | None:
    """``true``/``false``, or ``auto`` (``None``: the plugin decides from the device)."""
    if value is None or value == "auto":
        return None
    try:
        return coerce(value, bool, name)
    except ValueError:
        raise ValueError(f"{name} must be true, false or auto, got {value!r}") from None


#: The most threads :func:`default_prefetch_threads` picks: past it the processor rarely limits a GPU.
MAX_AUTO_PREFETCH_THREADS = 4
#: The most ``prefetch_threads`` may ask for: each thread keeps a batch ahead (prepared host tensors, pinned
#: on CUDA), so the count bounds the memory the pipeline holds (``globalcom2/lmms/batch_pipeline.py``).
MAX_PREFETCH_THREADS = 16


def default_prefetch_threads() -> int:
    """Encoding threads for ``prefetch_threads=auto``: a quarter of the cores this process may use, at least
    one and at most :data:`MAX_AUTO_PREFETCH_THREADS`. A process that may use every core of the node shares
    them with the other processes of a data-parallel launch there (``LOCAL_WORLD_SIZE``, which torchrun and
    accelerate set); one bound to a subset (Slurm's ``--cpus-per-task``) has its share already. The rest stay with the
    main thread (which drives the GPU, decodes answers and scores) and torch's own threads. On a 16-core GPU
    node with one process that is four: at the processor's ~30 ms per 672x672 image on one core, one thread
    alone would cap a cell near 33 images per second, the order of what a GPU generates with a compressed
    7B. The share is a judgement, not a measurement: ``prefetch_threads=N`` sets it."""
    node = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = node
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    sharing = processes if cores >= node else 1
    return max(1, min(MAX_AUTO_PREFETCH_THREADS, cores // (4 * sharing)))


def default_device() -> str:
    """The device a spec without one runs on (one process): CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_problems(
    spec: RunSpec,
    *,
    num_processes: int = 1,
    keys: Mapping[str, str] | None = None,
    memo: dict[Any, Any] | None = None,
    runs_here: bool = True,
) -> list[Exception]:
    """What the disk and this machine show to be wrong with ``spec`` before any weight loads: the device, the
    checkpoint (present, LLaVA-NeXT AnyRes, with weights), the method against the checkpoint's config, the
    compile backend. Empty when it can run.

    Args:
        keys: how the caller spells the keys (:data:`HYDRA_KEYS`).
        memo: shared by the checks of many specs (a sweep): each model is checked, and its config read, once.
        runs_here: ``False`` when the spec will run on another machine (a Slurm job, checked on the login
            node that submits it): this machine's devices and compile backend are not checked (the job
            checks them where it runs); the checkpoint, the method and the settings still are.
    """
    model = spec.model
    memo = {} if memo is None else memo
    key = repr((model, num_processes, runs_here))  # a spec may hold a mapping (attn_implementation)
    if key not in memo:
        problems: list[Exception] = (
            model_problems(None, device=model.device, num_processes=num_processes, keys=keys)
            if runs_here
            else []
        )  # the device alone
        config = None
        try:
            config = checkpoint_config(
                model.pretrained, random_init=model.random_init, keys=keys, revision=model.revision
            )
        except (FileNotFoundError, TypeError, ValueError) as err:
            problems.append(err)
        if model.compile is not None:
            device = torch.device(model.device or (default_device() if runs_here else "cuda"))
            problem = compile_problem(device, model.compile) if runs_here else None
            if problem is None and device.type == "cuda" and model.compile in CUDA_GRAPH_MODES:
                problem = (
                    "its CUDA graphs are recorded for every new prompt length inside the call that meets it, and "
                    "an evaluation's prompts vary in length, so its latencies would time recordings, not "
                    "replays; evaluate with compile=default (or max-autotune-no-cudagraphs), and time CUDA "
                    'graphs with `make bench-efficiency ARGS="--compile-mode reduce-overhead"`, which warms '
                    "every prompt first"
                )
            if problem:
                problems.append(RuntimeError(f"compile={model.compile}: {problem}"))
        memo[key] = (problems, config)
    problems, config = memo[key]
    problems = list(problems)
    if config is not None:
        try:
            spec.method.built.check_model_config(config)  # layer indices against the model's depths
        except (TypeError, ValueError) as err:
            problems.append(err)
    return problems


def _check_batch_invariant(compile_value: bool | str, attn: Any, key: Callable[[str], str]) -> None:
    """``batch_invariant`` runs eagerly and needs SDPA everywhere (``globalcom2.models.batch_invariant``): eager
    attention's softmax spans the padded keys, and compiled layers would trace through the mode."""
    if compile_value:
        raise ValueError(
            f"{key('batch_invariant')}=true cannot run with {key('compile')}={compile_value!r}: the batch-invariant "
            f"mode is eager by construction; set {key('compile')}=false"
        )
    values = attn.values() if isinstance(attn, Mapping) else [attn]
    if any(value != "sdpa" for value in values):
        raise ValueError(
            f"{key('batch_invariant')}=true needs {key('attn_implementation')}=sdpa (it runs attention row by row "
            f"on each row's own keys), got {attn!r}"
        )


def _compile_setting(value: Any, name: str) -> bool | str:
    """``compile``: a boolean (also ``"true"``/``"false"`` from a ``model_args`` string) or a compile mode."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None:
        return False
    if isinstance(value, bool) or value in COMPILE_MODES:
        return value
    raise ValueError(f"{name} must be true, false or one of {', '.join(COMPILE_MODES)}; got {value!r}")


def parse_overrides(value: Any, name: str) -> dict[str, Any] | None:
    """Generation settings as a mapping (``None`` for none): given as a mapping, a JSON object string, or an
    lmms-eval ``k=v,k=v`` string (``generation_overrides``; a cell's ``benchmark.gen_kwargs``)."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{name} is not valid JSON: {value!r} ({err})") from err
            if isinstance(parsed, dict):
                return parsed
        else:
            return parse_gen_kwargs(text, name)
    raise ValueError(f"{name} must be a mapping or 'k=v,...', got {value!r}")


def cli_option_conflicts(model_args: Mapping[str, Any], cli: Mapping[str, Any]) -> list[str]:
    """Where lmms-eval's ``--batch_size`` (``-b``) or ``--device`` disagrees with ``model_args``, in words.

    A value the user did not give is lmms-eval's default (``lmms_eval/__main__.py`` in 0.7.3): ``None``, or
    for the batch size the integer ``1``; a given one is the string the parser read (``-b 1`` is ``"1"``), so
    any spelling of the flag (``-b``, ``--batch``, ``--batch_size=8``) is compared by its value.
    """
    conflicts = []
    for key in ("batch_size", "device"):
        value = cli.get(key)
        if (
            value is None
            or key not in model_args
            or (key == "batch_size" and value == 1 and not isinstance(value, str))
        ):
            continue
        if str(value) != str(model_args[key]):
            conflicts.append(f"--{key} {value} and model_args {key}={model_args[key]} disagree; give one")
    return conflicts
