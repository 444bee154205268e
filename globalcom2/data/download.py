"""``make data``: download the ten benchmarks from the hub into the offline data directory.

Each benchmark's hub data (``BENCHMARKS[...].parts``: the repos lmms-eval 0.7.3 reads) is pinned to the
revision current at download time. Only the files of the split we evaluate are fetched: the repo's file
list is matched against the split's ``data_files`` patterns from its dataset card (or the hub's
``<config>/<split>-*`` layout when the card has none). ``datasets.load_dataset(split=...)`` would first
download and prepare every split of the config (VQAv2: val, test-dev and test, with images: hundreds of
GB). The total size is printed first, then each file with its own progress bar; files already in the
Hugging Face cache are not fetched again, and the hub resumes a partly downloaded file, so an
interrupted ``make data`` picks up where it stopped. The split is then saved with ``save_to_disk`` under
``$GLOBALCOM2_DATA_DIR/<key>`` (written to a temporary folder and renamed, so an interrupted download never
looks complete), and described in ``globalcom2_source.json`` (repo, config, split, revision, files,
bytes, rows, date).

It needs network access to the Hugging Face hub and a token (the ``lmms-lab-encoder`` datasets are
gated behind ``token: True``); without either it says so and exits non-zero:
2 = no token / offline mode set, 3 = hub unreachable. Existing folders are kept unless ``--force``: a complete
download of what ``BENCHMARKS`` names is reported as present; anything else there (synthetic fixture rows, a
download of another repo, config or split, a folder without its source record) is an error, exit code 4,
that names what it holds.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from globalcom2.atomic import staged_folder
from globalcom2.data.benchmarks import BENCHMARKS, LOCALLY_SCORED, Benchmark
from globalcom2.data.local import SOURCE_FILE, MissingDataError, check_saved_split, read_source_file
from globalcom2.hub import offline_reasons
from globalcom2.paths import DATA_DIR_ENV, data_dir

INSTRUCTIONS = (
    "To download: (1) get a Hugging Face token with access to the lmms-lab-encoder datasets and "
    "`export HF_TOKEN=hf_...` (or `hf auth login`); (2) make sure https://huggingface.co is reachable; "
    "(3) run `make data` (or `make data BENCHMARKS=pope,mme`). "
    f"Data goes to ${DATA_DIR_ENV} (now {{where}})."
)


class DownloadUnavailableError(RuntimeError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def check_access(repo: str) -> tuple[str, str]:
    """``(token, revision of repo)`` or :class:`DownloadUnavailableError` saying what is missing."""
    where = data_dir()
    offline = offline_reasons()
    if offline:
        raise DownloadUnavailableError(
            f"offline mode is set ({'; '.join(offline)}); downloading needs "
            f"the network. {INSTRUCTIONS.format(where=where)}",
            2,
        )
    from huggingface_hub import HfApi, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise DownloadUnavailableError(f"no Hugging Face token found. {INSTRUCTIONS.format(where=where)}", 2)
    try:
        info = HfApi().dataset_info(repo, token=token, timeout=20)
    except Exception as err:  # any network / auth failure: report it, do not retry silently
        raise DownloadUnavailableError(
            f"cannot reach {repo} on the Hugging Face hub ({type(err).__name__}: {err}). "
            f"{INSTRUCTIONS.format(where=where)}",
            3,
        ) from err
    return token, info.sha


def split_files(
    repo: str, config: str | None, split: str, revision: str, token: str
) -> list[tuple[str, int]]:
    """``(path in the repo, bytes)`` of the files that hold ``config``'s ``split``, nothing else."""
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(repo, revision=revision, token=token, files_metadata=True)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    patterns = card_patterns(getattr(info, "card_data", None), config, split)
    if not patterns:  # the hub's parquet layout: <config or data>/<split>-NNNNN-of-NNNNN.parquet
        folder = config or "data"
        patterns = [f"{folder}/{split}-*", f"{folder}/{split}/*"]
    chosen = sorted(
        f for f in sizes if f.endswith(".parquet") and any(fnmatch.fnmatch(f, p) for p in patterns)
    )
    if not chosen:
        raise DownloadUnavailableError(
            f"{repo} [{config or 'default'}] has no files for split {split!r} (looked for {patterns})", 3
        )
    return [(f, sizes[f]) for f in chosen]


def card_patterns(card_data: Any, config: str | None, split: str) -> list[str]:
    """The split's ``data_files`` patterns from a dataset card's ``configs`` section (empty if none; the
    caller then falls back to the hub's ``<config>/<split>-*`` layout). Only parquet files are read."""
    configs = (
        (card_data or {}).get("configs")
        if isinstance(card_data, dict)
        else getattr(card_data, "configs", None)
    )
    for entry in configs or []:
        if entry.get("config_name", "default") != (config or "default"):
            continue
        data_files = entry.get("data_files") or []
        if isinstance(data_files, (str, dict)):
            data_files = [data_files]
        for files in data_files:
            if isinstance(files, dict) and files.get("split") == split:
                paths = files.get("path")
                return [paths] if isinstance(paths, str) else list(paths or [])
            if isinstance(files, str) and split == "train":  # a bare pattern is the train split
                return [files]
    return []


def fetch_split(repo: str, files: list[tuple[str, int]], revision: str, token: str, label: str) -> list[str]:
    """Local paths of ``files``: from the Hugging Face cache when already there, else downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    total = sum(size for _, size in files)
    print(f"{label}: {len(files)} file(s), {total / 2**30:.2f} GiB")
    paths = []
    for number, (name, size) in enumerate(files, 1):
        cached = try_to_load_from_cache(repo, name, revision=revision, repo_type="dataset")
        state = "cached" if isinstance(cached, str) else "downloading"
        print(f"{label}: [{number}/{len(files)}] {name} ({size / 2**20:.1f} MiB) {state}", flush=True)
        if not isinstance(cached, str):
            cached = hf_hub_download(repo, name, repo_type="dataset", revision=revision, token=token)
        paths.append(cached)
    return paths


def held_problem(benchmark: Benchmark, target: Path) -> str | None:
    """Why the folder ``target`` is not a complete download of ``benchmark`` as ``BENCHMARKS`` defines it
    today (``None``: it is one): fixture rows, another repo, config or split, or a part missing on disk."""
    try:
        source = read_source_file(target)
    except MissingDataError as err:
        return f"its {SOURCE_FILE} is unreadable ({err})"
    if not source:
        return f"it has no {SOURCE_FILE} (not written by make data)"
    if source.get("kind") != "hub":
        return f"it holds {source.get('kind')!r} rows, not data downloaded from the hub"
    held = source.get("parts") or {}
    for part in benchmark.parts:
        recorded = held.get(part.subdir or ".") or {}
        wanted = {"repo": part.repo, "config": part.config, "split": part.split}
        have = {key: recorded.get(key) for key in wanted}
        if have != wanted:
            return f"part {part.subdir or '.'!r} was downloaded from {have}, not {wanted}"
        folder = target / part.subdir if part.subdir else target
        try:
            check_saved_split(
                folder, part.split, "the download", f"{benchmark.key}/{part.subdir}".rstrip("/")
            )
        except MissingDataError as err:
            return f"part {part.subdir or '.'!r} is not a whole saved {part.split!r} split ({err})"
    return None


def report_leftovers(key: str, root: Path) -> list[Path]:
    """The hidden folders a killed download of ``key`` left in ``root`` (its staging and arrow-cache
    folders, ``.<key>.*``; a SIGKILL or power loss gives no chance to remove them, and they can hold tens of
    GB), printed with their sizes. They are not deleted: another ``make data`` may be writing them now."""
    leftovers = sorted(p for p in root.glob(f".{key}.*") if p.is_dir())
    if leftovers:
        size = sum(f.stat().st_size for folder in leftovers for f in folder.rglob("*") if f.is_file())
        print(
            f"{key}: {len(leftovers)} folder(s) left by an interrupted download, {size / 2**30:.2f} GiB: "
            f"{', '.join(str(p) for p in leftovers)}; delete them when no other `make data` is running",
            file=sys.stderr,
        )
    return leftovers


def download_benchmark(benchmark: Benchmark, root: Path, force: bool = False) -> Path:
    """Download the evaluated split of every part of ``benchmark`` into ``root / key`` (atomically)."""
    import datasets

    target = root / benchmark.key
    if target.exists() and not force:
        problem = held_problem(benchmark, target)
        if problem is None:
            print(f"{benchmark.key}: already present (hub) at {target}; --force replaces it")
            return target
        raise DownloadUnavailableError(
            f"{benchmark.key}: {target} exists but {problem}; it is kept. To replace it with the hub's "
            f"data: `python -m globalcom2.data.download --benchmarks {benchmark.key} --force`",
            4,
        )
    root.mkdir(parents=True, exist_ok=True)
    report_leftovers(benchmark.key, root)
    arrow_cache = Path(tempfile.mkdtemp(prefix=f".{benchmark.key}.cache.", dir=root))  # gone afterwards
    try:
        with staged_folder(target) as staging:
            parts = {}
            for part in benchmark.parts:
                token, revision = check_access(part.repo)
                label = f"{benchmark.key}: {part.repo} [{part.config or 'default'}] {part.split} @ {revision[:10]}"
                files = split_files(part.repo, part.config, part.split, revision, token)
                paths = fetch_split(part.repo, files, revision, token, label)
                table = datasets.Dataset.from_parquet(paths, cache_dir=str(arrow_cache))
                folder = staging / part.subdir if part.subdir else staging
                datasets.DatasetDict({part.split: table}).save_to_disk(str(folder))
                parts[part.subdir or "."] = {
                    "repo": part.repo,
                    "config": part.config,
                    "split": part.split,
                    "revision": revision,
                    "files": [name for name, _ in files],
                    "bytes": sum(size for _, size in files),
                    "rows": len(table),
                }
            record = {
                "benchmark": benchmark.key,
                "kind": "hub",
                "parts": parts,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(arrow_cache, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the paper benchmarks for offline evaluation.")
    parser.add_argument(
        "--benchmarks",
        default=None,
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: the locally scored {','.join(LOCALLY_SCORED)})",
    )
    parser.add_argument("--force", action="store_true", help="replace folders that already exist")
    args = parser.parse_args(argv)
    if args.benchmarks is None:
        keys = list(LOCALLY_SCORED)
    else:
        keys = [k for k in args.benchmarks.split(",") if k]
        if not keys:
            print(
                f"--benchmarks {args.benchmarks!r} names no benchmark; choose from {', '.join(BENCHMARKS)}",
                file=sys.stderr,
            )
            return 2
    unknown = sorted(set(keys) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    root = data_dir()
    try:
        check_access(BENCHMARKS[keys[0]].parts[0].repo)  # fail fast, before any partial work
        for key in keys:
            print(f"-> {download_benchmark(BENCHMARKS[key], root, args.force)}")
    except DownloadUnavailableError as err:
        print(f"make data: {err}", file=sys.stderr)
        return err.code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
