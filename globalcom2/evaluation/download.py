"""``make data``: download the ten benchmarks from the hub into the offline data directory.

Each benchmark's hub data (``BENCHMARKS[...].parts``: the repos lmms-eval 0.7.3 reads) is pinned to the
revision current at download time, saved with ``save_to_disk`` under ``$GLOBALCOM2_DATA_DIR/<key>``
(written to a temporary folder and renamed, so an interrupted download never looks complete), and
described in ``globalcom2_source.json`` (repo, config, split, revision, rows, date).

It needs network access to the Hugging Face hub and a token (the ``lmms-lab-encoder`` datasets are
gated behind ``token: True``); without either it says so and exits non-zero:
2 = no token / offline mode set, 3 = hub unreachable. Existing folders are kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from globalcom2.evaluation.benchmarks import BENCHMARKS, Benchmark
from globalcom2.evaluation.local_data import DATA_DIR_ENV, SOURCE_FILE, data_dir

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
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


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def check_access(repo: str) -> tuple[str, str]:
    """``(token, revision of repo)`` or :class:`DownloadUnavailableError` saying what is missing."""
    where = data_dir()
    if any(_truthy(flag) for flag in OFFLINE_FLAGS):
        raise DownloadUnavailableError(
            f"offline mode is set ({', '.join(f for f in OFFLINE_FLAGS if _truthy(f))}); downloading needs "
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


def download_benchmark(benchmark: Benchmark, root: Path, force: bool = False) -> Path:
    """Download every part of ``benchmark`` into ``root / key`` (atomically); returns that folder."""
    import datasets

    target = root / benchmark.key
    if (target / SOURCE_FILE).is_file() and not force:
        kind = json.loads((target / SOURCE_FILE).read_text()).get("kind")
        print(f"{benchmark.key}: already present ({kind}) at {target}; --force replaces it")
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{benchmark.key}.", dir=root))
    try:
        parts = {}
        for part in benchmark.parts:
            token, revision = check_access(part.repo)
            print(
                f"{benchmark.key}: {part.repo} [{part.config or 'default'}] split {part.split} @ {revision[:10]}"
            )
            table = datasets.load_dataset(
                part.repo, name=part.config, split=part.split, token=token, revision=revision
            )
            folder = staging / part.subdir if part.subdir else staging
            datasets.DatasetDict({part.split: table}).save_to_disk(str(folder))
            parts[part.subdir or "."] = {
                "repo": part.repo,
                "config": part.config,
                "split": part.split,
                "revision": revision,
                "rows": len(table),
            }
        record = {
            "benchmark": benchmark.key,
            "kind": "hub",
            "parts": parts,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the paper benchmarks for offline evaluation.")
    parser.add_argument("--benchmarks", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--force", action="store_true", help="replace folders that already exist")
    args = parser.parse_args(argv)
    keys = [k for k in args.benchmarks.split(",") if k] or list(BENCHMARKS)
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
