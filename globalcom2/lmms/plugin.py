"""lmms-eval model plugin: LLaVA-NeXT with a compression method attached (id ``globalcom2_llava_next``).

Registered through the entry point ``lmms_eval.models: globalcom2 = globalcom2.lmms.manifest:manifests``
(see that module for why it is separate), so after ``pip install -e .``::

    python -m lmms_eval --model globalcom2_llava_next \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=random,retention_ratio=0.25 ...

``model_args``: ``pretrained`` (hub id, folder or ``tiny[:seed]``; required), ``revision`` (a hub id's branch,
tag or commit; default ``main``), ``method`` (default ``vanilla``), ``dtype`` (``auto`` = the checkpoint's),
``device``, ``batch_size``, ``attn_implementation`` (default ``sdpa``; a JSON object selects per sub-config),
``max_new_tokens`` (used when a task sets none; default 1024), ``records_path`` (JSONL sidecar of per-sample
records), ``answers_journal`` (a folder: each finished batch's answers are kept there as it finishes, and a run
given the folder of an interrupted one replays that run's batches instead of generating them again,
``globalcom2/answer_journal.py``; a cell uses its own), ``discard_stale_answers`` (empty such a folder written
under other settings instead of refusing it; a cell's is), ``profile`` (default true), ``warmup`` (untimed
generate calls before the first timed one; default 1; the first timed call is also reported apart,
``SampleRecord.first_call``), ``compile`` (``true`` or a ``torch.compile`` mode: the vision tower's and the
LLM's layers run compiled, ``globalcom2.models.compiled``), ``batch_invariant`` (every ``generate`` under
``globalcom2.models.batch_invariant``: a batch row gets its batch-1 answer bit for bit), ``random_init``
(build the 7B/13B architecture named by ``pretrained`` with random weights: speed and memory only),
``vicuna_text`` (with ``random_init``: each prompt's byte-level text cut to the token count Vicuna's
tokenizer gives it, recorded for the efficiency benchmark's prompts, ``globalcom2.protocol.vicuna_length``),
``protocol`` (``lmms_eval``, the default: the task's prompt and generation settings; ``llava``: the original
LLaVA evaluation the paper used, ``globalcom2.protocol.rules``),
``generation_overrides`` (under ``llava`` only: a JSON object, or one ``k=v`` pair, applied on top of LLaVA's
settings, e.g. a smaller ``max_new_tokens``), ``prefetch`` (``true``/``false``/``auto``: prepare the next
batches in background threads; auto = on CUDA), ``prefetch_threads`` (while prefetching, the threads that
run the processor side by side; ``auto``: a quarter of the cores, 1 to 4), ``input_cache_gib`` (GiB of encoded
inputs kept for the later runs of this process, which read an identical batch back instead of running the
processor again; default 0, off; ``globalcom2.lmms.input_cache``). Every other key is a parameter of
the method (e.g.
``retention_ratio``), converted to the type its ``__init__`` declares.

What the class guarantees:

* The Vicuna-v1 prompt is built here (``<image>\\n`` per image + the question: the task's context, or
  LLaVA's question-file text under ``protocol=llava``), as LLaVA's own evaluation does; the checkpoint's
  chat template is not used. Under ``llava`` the text lmms-eval scores is LLaVA's reading of the answer
  (POPE: ``eval_pope.py``); the records keep the raw answer.
* Requests are batched only with requests of identical generation settings, grouped by length and
  left-padded; they return in lmms-eval's order. The compression hooks are exact under padding, so answers
  equal those at batch size 1 in fp32 on the CPU (``tests/lmms``, tiny model); on CUDA, kernels chosen by
  the batch's shape can still flip a token, in bf16 often and in fp32 rarely (``make bench-batch-effect``
  measures it), and ``batch_invariant=true`` makes batch N equal batch 1 bit for bit in bf16. With ``prefetch`` (``auto``: on when the model runs on
  CUDA) the next batches are prepared in background threads while one generates (``lmms/batch_pipeline.py``);
  how many threads prepare them changes when a batch is ready, never what is in it.
* Data parallelism under ``torchrun``/``accelerate launch``: one full model copy per process; lmms-eval
  shards the documents, gathers the answers and scores on rank 0.
* With ``answers_journal``, each finished batch is appended to the journal before the next one starts, and a
  batch an interrupted run finished is replayed from it only where it would form again with the same rows in
  the same order among the same window of requests (``globalcom2/answer_journal.py``), so a resumed run
  answers as an uninterrupted one. A call that samples anywhere is neither journaled nor replayed.
* Generation errors propagate (with the task and doc ids added); nothing is swallowed. Empty answers
  are counted, logged and flagged in the records.
* Per-sample :class:`~globalcom2.sample_records.SampleRecord`\\ s: ``lm.records`` (this
  process), ``lm.gather_records()`` (all processes, collective), ``lm.records_summary()``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from globalcom2 import sample_records as sr
from globalcom2.answer_journal import AnswerJournal, Replay, RowKey, code_digest, row_key, window_digest
from globalcom2.anyres import config_layout
from globalcom2.efficiency.summary import latency_summary
from globalcom2.lmms.batch_pipeline import (
    DEFAULT_LOOKAHEAD,
    DEFAULT_WINDOW,
    BatchFeeder,
    ReadyBatch,
    ReplayedBatch,
)
from globalcom2.lmms.input_cache import CachedEncoder, encoder_fingerprint, shared_input_cache
from globalcom2.lmms.manifest import MODEL_ID
from globalcom2.models.batch_invariant import batch_invariant, forced_gqa
from globalcom2.models.compiled import WARMUP_NEW_TOKENS, compile_model
from globalcom2.models.preload import check_device
from globalcom2.protocol.batching import PreparedBatch, decode_answer, prepare_batch
from globalcom2.protocol.generation import GenerationSettings
from globalcom2.protocol.rules import geometry_of, task_protocol
from globalcom2.protocol.tokenization import encode_batch
from globalcom2.protocol.vicuna_length import SOURCE as VICUNA_SOURCE
from globalcom2.protocol.vicuna_length import prompt_text_tokens
from globalcom2.run_spec import (
    RunSpec,
    cli_option_conflicts,
    default_prefetch_threads,
    parse_model_args,
    run_problems,
)

__all__ = ["MODEL_ID", "GlobalCom2LlavaNext"]


class GlobalCom2LlavaNext(lmms):
    """A simple-type lmms-eval model: LLaVA-NeXT + one attached compression method."""

    is_simple = True

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> GlobalCom2LlavaNext:
        """lmms-eval's constructor path: the ``model_args`` string through the front door
        (:meth:`RunSpec.from_model_args`), with the CLI's own ``--batch_size``/``--device`` (lmms-eval passes
        both as keywords, ``lmms.create_from_arg_string``, lmms_eval/api/model.py in 0.7.3) used where
        ``model_args`` does not name them, and refused where they disagree (:func:`cli_option_conflicts`)."""
        args = parse_model_args(arg_string)
        conflicts = cli_option_conflicts(args, additional_config or {})
        if conflicts:
            raise ValueError("; ".join(conflicts))
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def __init__(self, spec: RunSpec | None = None, **model_args: Any) -> None:
        """``GlobalCom2LlavaNext(pretrained=..., method=..., retention_ratio=0.25, ...)``: ``model_args``, parsed
        and checked against the checkpoint's config (no weight loaded yet); or ``GlobalCom2LlavaNext(spec)``
        with a :class:`RunSpec` that has passed that check already (``globalcom2.worker``)."""
        super().__init__()
        if spec is None:
            spec = RunSpec.from_model_args(model_args)
            checked = False
        elif model_args:
            raise TypeError(f"give a RunSpec or model_args, not both (got {sorted(model_args)} too)")
        else:
            checked = True
        self.spec = spec
        options = spec.options
        self.protocol = options.protocol
        self.generation_overrides = options.generation_overrides
        self.batch_size_per_device = options.batch_size
        self.default_max_new_tokens = options.max_new_tokens
        self.warmup_calls = options.warmup
        self.profile = options.profile
        self.records_path = options.records_path
        self.random_init = spec.model.random_init
        self.vicuna_text = spec.model.vicuna_text
        self.attn_implementation = spec.model.attn_implementation
        self.method = spec.method.built  # built once, by the spec; this same instance is attached below
        self._sampling_warned = False
        self._ignored_warned: set[tuple[str, tuple[str, ...]]] = set()  # (task, keys) warned about once

        # cpu=True for a CPU cell: under accelerate/torchrun on a machine with GPUs, Accelerator() would pick
        # NCCL and cuda:<local_rank>, and lmms-eval's gathers of CPU tensors would fail there.
        self.accelerator = Accelerator(cpu=spec.model.device == "cpu")
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self._device = self._choose_device(spec.model.device)
        # auto: background threads help when the model runs on a GPU; on a CPU they take cores from the model
        self.prefetch = self._device.type == "cuda" if options.prefetch is None else options.prefetch
        # 0: each batch is prepared in the main thread, in turn
        self.prefetch_threads = (
            (options.prefetch_threads or default_prefetch_threads()) if self.prefetch else 0
        )
        if options.prefetch_threads is not None and not self.prefetch:
            logger.warning(
                f"prefetch_threads={options.prefetch_threads} is not used: prefetch=auto is off on "
                f"{self._device.type} (each batch is prepared in turn); set prefetch=true to use the threads"
            )
        self.input_cache_gib = options.input_cache_gib
        self.compile_mode = spec.model.compile
        self.batch_invariant = spec.model.batch_invariant
        if not checked:
            # The checkpoint's config alone (and the compile backend): a model that is not LLaVA-NeXT AnyRes,
            # or a layer index past its depth, fails here, before the weights load.
            problems = run_problems(replace(spec, model=replace(spec.model, device=str(self._device))))
            if problems:
                raise problems[0]

        from globalcom2 import attach, load_llava_next
        from globalcom2.efficiency.profile import GenerateProfiler
        from globalcom2.models.loader import hub_commit

        self.pretrained = spec.model.pretrained
        # Resolved once here: every read of this load, and the record, name one commit (a cell's is already one).
        self.revision = None if self.random_init else hub_commit(self.pretrained, spec.model.revision)
        # the encoded inputs of earlier cells of this process, read back where a batch is the same (0 GiB: off,
        # and an earlier run's entries are let go before this model loads, so both are never held at once)
        shared = shared_input_cache(self.input_cache_gib)
        self.model, self.processor = load_llava_next(
            self.pretrained,
            dtype=spec.model.dtype,
            device=self._device,
            attn_implementation=self.attn_implementation,
            random_init=self.random_init,
            geometry=geometry_of(self.protocol),
            revision=self.revision,
        )
        self.tokenizer = self.processor.tokenizer
        self.input_cache = (
            CachedEncoder(
                shared,
                encoder_fingerprint(
                    self.processor,
                    self.model.config,
                    protocol=self.protocol,
                    vicuna_text=self.vicuna_text,
                    dtype=self.model.dtype,
                ),
            )
            if self.input_cache_gib
            else None
        )
        self.attachment = attach(self.model, self.method)
        # Compiled after attaching: the method's hooks stay outside the compiled layers (models/compiled.py).
        self.compiled = compile_model(self.model, self.compile_mode) if self.compile_mode else None
        try:  # a constructor that fails from here on gives its compiled layers back (release)
            self.profiler = GenerateProfiler(self.model, self._device)
            eos = self.model.generation_config.eos_token_id
            self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            self._pad_id = self.tokenizer.pad_token_id
            self._warmed_up = False
            # compiled: whether batch size 1 still needs its own warm-up before this call's batches (generate_until)
            self._single_row_pending = False
            self._single_row_warmed = False
            self._measured_calls = 0
            self.journal = (
                AnswerJournal(
                    options.answers_journal,
                    self._rank,
                    self.journal_settings(),
                    options.discard_stale_answers,
                )
                if options.answers_journal
                else None
            )
            if self.journal is not None and self.journal.discarded:
                logger.warning(
                    f"{options.answers_journal}: {self.journal.discarded}: discarded, generated again"
                )
            # batch ids go on from the journal's, so that (rank, batch id) names one generate call (SampleRecord)
            self._batches = self.journal.next_batch_id if self.journal else 0
            self.records: list[sr.SampleRecord] = []
            # wall time inside generate_until (the rest of lmms-eval's is scoring)
            self.generate_until_s = 0.0
        except BaseException:
            self.release(failed=True)
            raise

    # -- properties lmms-eval uses ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    def _choose_device(self, device: str | None) -> torch.device:
        if self._world_size > 1:
            if device not in (None, "cuda", "cpu"):
                raise ValueError(
                    f"device={device!r} with {self._world_size} processes: each process uses its own device; "
                    "pass no device (or 'cuda'/'cpu')"
                )
            return torch.device("cpu") if device == "cpu" else self.accelerator.device
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return check_device(device)

    @property
    def run_info(self) -> dict[str, Any]:
        """What produced the answers: checkpoint, method, attention actually used, devices."""
        config = self.model.config
        return {
            "model_id": MODEL_ID,
            "pretrained": self.pretrained,
            "random_init": self.random_init,
            # the prompts' text cut to Vicuna's token count (random_init only), and where the counts come from
            "vicuna_text": VICUNA_SOURCE if self.vicuna_text else None,
            "checkpoint": getattr(config, "_name_or_path", None),
            "revision": self.revision,  # the hub commit loaded; None for a folder or random weights
            "method": self.method.name,
            "method_params": self.method.params(),
            "dtype": str(self.model.dtype),
            "device": str(self._device),
            "world_size": self._world_size,
            "batch_size": self.batch_size_per_device,
            "attn_implementation_requested": self.attn_implementation,
            "attn_implementation": self.resolved_attn_implementation(),
            "profile": self.profile,
            "warmup_calls": self.warmup_calls,
            "protocol": self.protocol,
            "geometry": geometry_of(self.protocol),
            "generation_overrides": self.generation_overrides,
            "compile": self.compile_mode,
            # dynamo frames this run compiled (0 where an earlier cell of the process compiled the same
            # signature, models/layer_code.py), gave up on (those layers ran eager), and its graph breaks;
            # None: eager
            "compile_frames": self.compile_frames(),
            "batch_invariant": self.batch_invariant,
            "prefetch": self.prefetch,
            "prefetch_threads": self.prefetch_threads,
            "input_cache_gib": self.input_cache_gib,
            # this run's encodings (the warm-up's included) read from the cache and made (None: off), and the
            # bytes the cache holds; lmms/input_cache.py
            "input_cache": None if self.input_cache is None else self.input_cache.summary(),
        }

    def compile_frames(self) -> dict[str, int] | None:
        """The dynamo frames compiled and given up on, and the graph breaks, in this process since this run
        compiled its model (``None`` when it runs eager). The counters are the process's: cells run one after another in it."""
        return None if self.compiled is None else self.compiled.frames()

    def release(self, failed: bool = False) -> None:
        """The end of the run (``globalcom2.worker``; ``failed``: it ended with an error): a compiled model's
        eager layers come back, its recompile limits are released, and a run in which dynamo gave up on a
        frame, which it marks on the layer code a later cell would share, leaves that code unshared
        (``CompiledLayers.remove``). A finished run with such a frame is warned about: some of its compiled
        layers ran eager, and its latencies mix the two; so is one in which dynamo met a graph break (a layer
        that ran as several graphs). (A failed run's error says what happened; a frame whose compilation
        raised counts as given up on too.)"""
        frames = self.compile_frames()
        if frames and frames["failed"] and not failed:
            logger.warning(
                f"compile={self.compile_mode}: dynamo gave up on {frames['failed']} frames in this run (a "
                "recompile limit or an error it swallowed): those layers ran eager, so the run's latencies mix "
                "compiled and eager layers; TORCH_LOGS=recompiles,graph_breaks says which"
            )
        if frames and frames["graph_breaks"] and not failed:
            logger.warning(
                f"compile={self.compile_mode}: dynamo met {frames['graph_breaks']} graph breaks in this run: some "
                "compiled layers ran as several graphs with host work between them, which the latencies include; "
                "TORCH_LOGS=graph_breaks says where"
            )
        if self.compiled is not None:
            self.compiled.remove()

    def journal_settings(self) -> dict[str, Any]:
        """What decides a batch's rows and their answers, for the answers journal (``answer_journal.py``): the
        code, the checkpoint's content and its load, the method, the protocol, the device (its kind, and each
        rank's GPU model or CPU instruction set, in rank order) and the library versions, and how batches form
        (the batch size, the process count that shards the requests, the feeder's window). Collective where
        several processes run: every rank calls it (the plugin's constructor does)."""
        from globalcom2.models.fingerprint import checkpoint_identity
        from globalcom2.provenance import package_versions

        info = self.run_info
        answering = (
            "pretrained", "random_init", "vicuna_text", "revision", "method", "method_params", "dtype",
            "attn_implementation", "protocol", "geometry", "generation_overrides", "compile", "batch_invariant",
        )  # fmt: skip
        versions = package_versions()
        return {
            **{key: info[key] for key in answering},
            "device": self._device.type,
            "hardware": self._every_rank(
                torch.cuda.get_device_name(self._device)
                if self._device.type == "cuda"
                else f"cpu:{torch.backends.cpu.get_cpu_capability()}"
            ),
            # content, not name: a retrained folder is other weights (its digests are cached: file_digest.py)
            "weights": checkpoint_identity(
                self.pretrained, random_init=self.random_init, revision=self.revision
            ),
            "code": code_digest(),
            "max_new_tokens": self.default_max_new_tokens,
            "batch_size": self.batch_size_per_device,
            "world_size": self._world_size,
            "window": DEFAULT_WINDOW,
            "versions": {name: versions.get(name) for name in ("torch", "transformers", "lmms_eval")},
        }

    def resolved_attn_implementation(self) -> dict[str, str | None]:
        config = self.model.config
        return {
            "text_config": getattr(config.text_config, "_attn_implementation", None),
            "vision_config": getattr(config.vision_config, "_attn_implementation", None),
        }

    # -- records -----------------------------------------------------------------------------------------
    def records_summary(self) -> dict[str, Any]:
        """:func:`~globalcom2.sample_records.summarize` of this process's records."""
        return sr.summarize(self.records)

    def gather_records(self) -> list[sr.SampleRecord]:
        """Records of every process, sorted by (task, split, doc id). Collective: call it on all ranks."""
        rows = [row for part in self._every_rank([r.to_dict() for r in self.records]) for row in part]
        return sorted((sr.SampleRecord.from_dict(row) for row in rows), key=sr.sort_key)

    def _every_rank(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order. Collective: call it on all ranks."""
        if self._world_size == 1:
            return [value]
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # this rank's value alone would pass as every rank's (a partial records sidecar)
            raise RuntimeError(
                f"{self._world_size} processes but no torch.distributed process group: the other processes' "
                "values cannot be gathered"
            )
        gathered: list[Any] = [None] * self._world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def reset_records(self) -> None:
        self.records.clear()

    # -- lmms-eval API ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        began = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        settings: dict[str, GenerationSettings] = {}
        for index, request in enumerate(requests):
            if request.metadata and request.metadata.get("__padding_only__"):
                results[index] = GenerationResult(text="")  # lmms-eval drops padding answers unread
                continue
            try:
                setting = task_protocol(self.protocol, request.args[4]).generation(
                    request.args[1], self.default_max_new_tokens, self.generation_overrides
                )
            except (TypeError, ValueError) as err:  # name the task whose settings they are
                raise type(err)(f"task {request.args[4]!r}: {err}") from err
            if setting.do_sample and not self._sampling_warned:
                self._sampling_warned = True
                logger.warning(
                    f"{request.args[4]}: sampling is on (do_sample/temperature); answers then depend on the "
                    "random state, i.e. on batch composition and the number of processes"
                )
            if setting.ignored and (request.args[4], setting.ignored) not in self._ignored_warned:
                self._ignored_warned.add((request.args[4], setting.ignored))
                logger.warning(
                    f"{request.args[4]}: generation_kwargs {list(setting.ignored)} are not used "
                    f"(do_sample={setting.do_sample}; see globalcom2.protocol.generation)"
                )
            settings[setting.key()] = setting
            groups.setdefault(setting.key(), []).append(index)
        # A compiled model meets batch size 1 as a graph of its own: warm it up only where a batch of one row
        # will run (each group's last batch holds its remainder), so cells without one compile nothing extra.
        self._single_row_pending = (
            self.compiled is not None
            and not self._single_row_warmed
            and self.batch_size_per_device > 1
            and any(len(indices) % self.batch_size_per_device == 1 for indices in groups.values())
        )
        generated = sum(len(indices) for indices in groups.values())  # padding requests are not generated
        progress = tqdm(total=generated, disable=self._rank != 0, desc="globalcom2 generate")
        by_position: dict[int, sr.SampleRecord] = {}
        # A call that samples anywhere is neither journaled nor replayed: a sampled answer depends on the random
        # state, which everything generated before it moves (a warm-up, the earlier batches, greedy ones too).
        journal = None if any(s.do_sample for s in settings.values()) else self.journal
        keys = [self._row_key(request) for request in requests] if journal else []
        replay = journal.replay(keys) if journal else None
        # the batch-invariant mode's environment switch, set while no prefetch thread runs (batch_invariant.py);
        # the journal synced and closed when the call ends, by an error too (the next append reopens it)
        invariant = forced_gqa() if self.batch_invariant else contextlib.nullcontext()
        closing = contextlib.closing(journal) if journal is not None else contextlib.nullcontext()
        with progress, invariant, closing:
            for key, indices in groups.items():
                feeder = self._feeder(requests, replay)
                mark = time.perf_counter()
                for ready, waited in feeder.batches(indices):  # the feeder's thread is joined when this ends
                    if isinstance(ready, ReplayedBatch):
                        records = ready.journaled.sample_records()
                        outputs = [self._result(record) for record in records]
                        now = time.perf_counter()  # reading back is no batch's turn of the loop
                    else:
                        outputs, records, warmup_s = self._generate_batch(ready, settings[key], waited)
                        now = time.perf_counter()
                        for record in records:  # the batch's whole turn of the loop, waiting included,
                            record.loop_s = now - mark - warmup_s  # its untimed warm-up not
                        # the append's time goes to the next batch's turn, as all bookkeeping does
                        if journal is not None:
                            window = window_digest([keys[i] for i in ready.window])
                            journal.append([keys[i] for i in ready.indices], window, records)
                    for i, output, record in zip(ready.indices, outputs, records, strict=True):
                        results[i] = output
                        by_position[i] = record
                    mark = now
                    progress.update(len(ready.indices))
        new_records = [by_position[i] for i in sorted(by_position)]  # lmms-eval's order
        self.records += new_records
        self._report(new_records)
        self.generate_until_s += time.perf_counter() - began
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{MODEL_ID} only generates (all ten paper benchmarks are generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} does not support multi-round generation")

    def clean(self) -> None:
        """Free cached memory but keep the model: unlike lmms-eval's default, which deletes every
        ``nn.Module`` attribute, an instance can serve several ``simple_evaluate`` calls."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- one batch -------------------------------------------------------------------------------------
    @staticmethod
    def _row_key(request: Instance) -> RowKey:
        """The answers journal's key of a request: its task, split, document, index, prompt and settings."""
        context, gen_kwargs, _, doc_id, task, split = request.args
        return row_key(task, split, doc_id, request.idx, context, gen_kwargs)

    def _feeder(self, requests: list[Instance], replay: Replay | None = None) -> BatchFeeder:
        """Batches of ``requests``, grouped by length and prepared in background threads
        (``lmms/batch_pipeline.py``), each encoding thread with its own copy of the processor: a fast tokenizer
        is not safe to use from two threads at once (PyO3 refuses a second borrow: "Already borrowed",
        https://github.com/huggingface/tokenizers/issues/537), and this thread decodes answers meanwhile."""
        threads = max(1, self.prefetch_threads)
        # One copy per encoding thread, made here, by the thread that owns the processor (about 1 ms each) and
        # before any batch is timed; each encoding thread takes its own on its first batch.
        spares: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads if self.prefetch else 0):
            spares.put(copy.deepcopy(self.processor))
        taken = threading.local()

        def processor_here() -> Any:
            if not self.prefetch:  # every batch is encoded in this thread, between generations
                return self.processor
            if not hasattr(taken, "processor"):
                taken.processor = spares.get_nowait()  # a pool never runs more threads than copies
            return taken.processor

        config = self.model.config

        def load(positions: Sequence[int]) -> PreparedBatch:
            chosen = [requests[i] for i in positions]
            try:
                return prepare_batch(chosen, self.task_dict, self.protocol)
            except Exception as err:  # a broken image or document: name it, as a failed generation is named
                raise RuntimeError(
                    f"loading failed for {failing_documents(chosen)}: {type(err).__name__}: {err}"
                ) from err

        def failing_documents(chosen: list[Instance]) -> str:
            """``task#doc`` of the requests that fail alone (all of them, if none does alone)."""
            failing = []
            for request in chosen:
                try:
                    prepare_batch([request], self.task_dict, self.protocol)
                except Exception:  # only to name it: the batch's own error is the one raised
                    failing.append(request)
            return ", ".join(f"{r.args[4]}#{r.args[3]}" for r in failing or chosen)  # task#doc

        def encode(batch: PreparedBatch) -> Any:
            try:
                return self._encode(processor_here(), batch)
            except Exception as err:
                # named, its type kept (a refusal stays a ValueError); exception notes need Python >= 3.11
                getattr(err, "add_note", lambda note: None)(
                    f"while preparing the model inputs of {batch.tag()}"
                )
                raise

        return BatchFeeder(
            load,
            encode,
            lambda image: config_layout(config, (image.height, image.width)).num_tokens,
            self.batch_size_per_device,
            window=DEFAULT_WINDOW,  # in the journal's settings: it decides which rows share a batch
            lookahead=DEFAULT_LOOKAHEAD if self.prefetch else 0,
            threads=threads,
            replay=replay,
        )

    def _encode(self, processor: Any, batch: PreparedBatch) -> dict[str, torch.Tensor]:
        """The batch's model inputs on the host (pinned for a CUDA model), tokenised as the protocol says, or
        a copy of what an earlier cell's identical batch encoded to (``input_cache_gib``)."""
        pin = self._device.type == "cuda"
        if self.input_cache is not None:
            return self.input_cache.encode(batch, lambda: self._host_inputs(processor, batch), pinned=pin)
        inputs = self._host_inputs(processor, batch)
        return {k: v.pin_memory() if pin else v for k, v in inputs.items()}

    def _host_inputs(self, processor: Any, batch: PreparedBatch) -> dict[str, torch.Tensor]:
        """What the processor makes of the batch, pixels in the model's dtype."""
        inputs = dict(
            encode_batch(
                processor,
                self.model.config,
                batch.prompts,
                batch.images,
                batch.images_per_row,
                self.protocol,
                text_tokens=prompt_text_tokens if self.vicuna_text else None,
            )
        )
        if "pixel_values" in inputs:  # cast on the host: half the bytes to copy in bf16, same values
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate_batch(
        self, ready: ReadyBatch, setting: GenerationSettings, waited: float
    ) -> tuple[list[GenerationResult], list[sr.SampleRecord], float]:
        """Answers and records of one batch, and the seconds of the warm-up run before it (0.0 if none)."""
        batch = ready.prepared
        host = ready.inputs  # the same values, on the host: read from here, not from the device
        inputs = {k: v.to(self._device, non_blocking=True) for k, v in host.items()}
        sequences, measurement, row_stats, warmup_s = self._generate(inputs, setting, batch)
        first_call = measurement is not None and self._measured_calls == 1
        generated = time.perf_counter()

        prompt_length = host["input_ids"].shape[1]
        new_tokens = sequences[:, prompt_length:].tolist()  # [B][new tokens], one device read
        prompt_lengths = host["attention_mask"].sum(1).tolist()  # [B] unpadded prompt tokens
        outputs, records = [], []
        for row, (task, split, doc_id) in enumerate(batch.keys):
            decoded = decode_answer(self.tokenizer, new_tokens[row], self._eos_ids, setting.until)
            before, llm_input, after = sr.visual_token_counts(row_stats[row])
            prompt_tokens = int(prompt_lengths[row])
            record = sr.SampleRecord(
                task=task,
                split=split,
                doc_id=doc_id,
                rank=self._rank,
                batch_id=self._batches,
                batch_size=len(batch.keys),
                method=self.method.name,
                method_params=self.method.params(),
                attn_implementation=self.resolved_attn_implementation(),
                num_images=batch.images_per_row[row],
                image_sizes=batch.image_sizes_of(host.get("image_sizes"), row),
                prompt_tokens=prompt_tokens,
                llm_prompt_tokens=prompt_tokens - before + llm_input,
                visual_tokens_before=before,
                visual_tokens_llm_input=llm_input,
                visual_tokens_after=after,
                output_tokens=len(decoded.token_ids),
                output_token_ids=decoded.token_ids,
                answer=decoded.answer,
                empty_answer=decoded.answer == "",
                stop_reason=decoded.stop_reason,
                preprocess_s=ready.preprocess_s,
                load_s=ready.load_s,
                wait_s=waited,
                prefill_s=measurement.prefill_s if measurement else None,
                total_s=measurement.total_s if measurement else None,
                peak_memory_bytes=measurement.peak_memory_bytes if measurement else None,
                peak_memory_note=measurement.peak_memory_note if measurement else "profile=false",
                clock=measurement.clock if measurement else None,
                compression=list(row_stats[row]),
                peak_memory_reserved_bytes=measurement.peak_memory_reserved_bytes if measurement else None,
                stages_s=dict(measurement.stages) if measurement else None,
                llm_forward_s=measurement.llm_forward_s if measurement else None,
                first_call=first_call,
                compiled_in_call=measurement.compiled if measurement else False,
                text_tokens=prompt_tokens - before,
            )
            if record.empty_answer:
                logger.warning(f"empty answer for {task} doc {doc_id} (stop: {record.stop_reason})")
            records.append(record)
            protocol = task_protocol(self.protocol, task)
            record.scored_answer = protocol.read_answer(record.answer)
            record.unread_answer = protocol.unread(record.answer)
            outputs.append(self._result(record))
        postprocess_s = time.perf_counter() - generated
        for record in records:
            record.postprocess_s = postprocess_s
        self._batches += 1
        return outputs, records, warmup_s

    @staticmethod
    def _result(record: sr.SampleRecord) -> GenerationResult:
        """What lmms-eval gets for a request: the protocol's reading of the answer, and the token counts."""
        counts = TokenCounts(input_tokens=record.llm_prompt_tokens, output_tokens=record.output_tokens)
        return GenerationResult(text=record.scored_answer, token_counts=counts)

    def _generate(
        self, inputs: Any, setting: GenerationSettings, batch: PreparedBatch
    ) -> tuple[Any, Any, list, float]:
        """``model.generate`` (warm-up first if due; measured if profiling); errors re-raised with context.
        Returns the sequences, the measurement, the per-row stats and the warm-up's seconds."""
        kwargs = {**setting.generate_kwargs(), "pad_token_id": self._pad_id}
        measurement = None
        warmup_s = 0.0
        mode = batch_invariant() if self.batch_invariant else contextlib.nullcontext()
        try:
            with torch.inference_mode(), mode:
                if self.profile and self.warmup_calls and (not self._warmed_up or self._single_row_pending):
                    began = time.perf_counter()
                    self._warm_up(inputs, kwargs, batch)
                    warmup_s = time.perf_counter() - began
                self._warmed_up = True
                self.attachment.stats.clear()  # only this call's stats from here on
                if self.profile:
                    with self.profiler.measure() as pending:
                        sequences = self.model.generate(**inputs, **kwargs)
                    measurement = pending.result
                    self._measured_calls += 1
                else:
                    sequences = self.model.generate(**inputs, **kwargs)
        except Exception as err:
            raise RuntimeError(
                f"generation failed for {batch.tag()} (method {self.method!r}): {err}"
            ) from err
        try:
            row_stats = sr.assign_stats(list(self.attachment.stats), batch.images_per_row)
        except RuntimeError as err:
            raise RuntimeError(
                f"the method's statistics do not match the batch of {batch.tag()}: {err}"
            ) from err
        self.attachment.stats.clear()
        return sequences, measurement, row_stats, warmup_s

    def _warm_up(self, inputs: dict[str, torch.Tensor], kwargs: dict[str, Any], batch: PreparedBatch) -> None:
        """The untimed calls before a measured one: on the first measured batch, and :data:`WARMUP_NEW_TOKENS`
        new tokens meet every graph a compiled model needs at its batch size, whatever the task's own limit (a
        task of 1 or 2 new tokens would otherwise leave the later decode steps' graphs to a later task's timed
        call). Where a batch of one row will run later (``_single_row_pending``, set per ``generate_until``), a
        compiled model is also warmed on this batch's first row alone, since batch size 1 is a graph of its
        own. A shape no warm-up met still compiles in its timed call, which the profiler flags
        (``SampleRecord.compiled_in_call``) and the statistics leave out."""
        tokens = WARMUP_NEW_TOKENS
        warm = {**kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens}
        runs = [] if self._warmed_up else [inputs]
        if self._single_row_pending:
            self._single_row_pending, self._single_row_warmed = False, True
            if len(batch.keys) > 1:
                row = self._encode(self.processor, batch.select([0]))  # this thread's own processor
                runs.append({k: v.to(self._device, non_blocking=True) for k, v in row.items()})
            elif not runs:
                runs.append(inputs)  # this batch is the one row
        for run in runs:
            self.profiler.warmup(lambda run=run: self.model.generate(**run, **warm), self.warmup_calls)

    def _report(self, new_records: list[sr.SampleRecord]) -> None:
        """Warn about empty answers, pass the call's summary to lmms-eval, write the sidecar (rank 0)."""
        report_call(new_records, self._rank)
        if self.records_path:
            everything = self.gather_records()
            if self._rank == 0:
                sr.write_jsonl(self.records_path, everything)


def report_call(records: list[sr.SampleRecord], rank: int) -> dict[str, Any]:
    """Summarise one ``generate_until`` call: warn about empty and unread answers and hand lmms-eval the numbers
    for its ``throughput`` block (``log_metrics``; lmms-eval keeps them per process, not gathered)."""
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    summary = sr.summarize(records)
    if summary["empty_answers"]:
        logger.warning(
            f"{summary['empty_answers']} of {summary['samples']} answers on rank {rank} are empty; they are "
            "scored as given (see the records' empty_answer / stop_reason)"
        )
    for task, count in summary["unread_answers"].items():
        logger.warning(
            f"{count} answers of {task} on rank {rank} could not be read as the protocol reads them and were "
            "scored as its default (see the records' unread_answer / scored_answer)"
        )
    if records:
        latency = latency_summary(records)
        # the timed calls only, as in every figure beside it: not the first call, nor one that compiled
        timed = [r for r in records if r.in_statistics]
        calls = {(r.rank, r.batch_id): r for r in timed}.values()
        total = sum(r.total_s or 0.0 for r in calls)
        tokens = sum(r.output_tokens for r in timed)
        prefill = latency["prefill_ms"]
        # lmms-eval's avg_latency is total_elapsed_time / total_requests: both over the timed calls
        extras = {
            "total_requests": len(timed),
            "answered_requests": len(records),
            "empty_answers": summary["empty_answers"],
            "visual_tokens_before": summary["mean_visual_tokens_before"],
            "visual_tokens_after": summary["mean_visual_tokens_after"],
            "prefill_ms": prefill["mean"] if prefill else None,
            "samples_per_s": latency["throughput_samples_per_s"],
        }
        if total > 0:  # with no timed call (profile=false, or only the first call) there is no speed to log
            log_metrics(total, tokens, tokens / total, {k: v for k, v in extras.items() if v is not None})
        else:
            logger.info(f"no timed generate call on rank {rank}: lmms-eval's throughput block gets no entry")
    return summary
