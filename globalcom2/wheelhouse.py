"""Every wheel an offline install needs, for a target Python and platform: ``make wheelhouse``.

Cluster compute nodes often have no package index. ``make wheelhouse`` runs this on a machine that has one
and fills a folder that ``make install WHEELHOUSE=<folder>`` installs from with ``--no-index``.

It runs before any environment exists, so it uses the standard library and pip only (run it by path:
``python globalcom2/wheelhouse.py``). Three steps:

1. Resolve the project (with its ``dev`` extra), the build backend and ``TORCH_SPEC`` for this machine,
   downloading what the index has. A dependency with no wheel on the index (an sdist, such as
   ``antlr4-python3-runtime``, which hydra-core pins) is built into a wheel here. A pure-Python one builds a
   ``py3-none-any`` wheel, which suits any target. One that builds a platform wheel is refused for another
   target, by name: it must be built on the target itself.
2. With ``--platform``/``--python-version``, resolve again for that target with ``--only-binary=:all:``
   (pip's rule for a foreign target), finding the wheels of step 1 through ``--find-links``.
3. Build the project's own wheel.

Under ``--platform manylinux…_x86_64`` PyPI's torch is the CUDA build, with its ``nvidia-*`` wheels (several
GB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")  # pyproject.toml [build-system], for the editable install


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def requirements(torch_spec: str) -> list[str]:
    return [f"{PROJECT}[dev]", torch_spec, *BUILD_REQUIREMENTS]


def build_sdists(source: Path, out: Path, foreign: bool) -> list[str]:
    """Turn every sdist in ``source`` into a wheel in ``out``; returns the wheels' names."""
    built = []
    for sdist in sorted([*source.glob("*.tar.gz"), *source.glob("*.zip")]):
        before = set(out.glob("*.whl"))
        pip("wheel", "--no-deps", "--wheel-dir", str(out), str(sdist))
        new = sorted(set(out.glob("*.whl")) - before)
        platform_wheels = [w.name for w in new if not w.name.endswith("-none-any.whl")]
        if foreign and platform_wheels:
            raise SystemExit(
                f"{sdist.name} has no wheel on the index and builds a platform wheel ({platform_wheels[0]}): "
                "build the wheelhouse on the target machine itself (no PLATFORM)"
            )
        built += [w.name for w in new]
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "wheelhouse")
    parser.add_argument("--platform", default="", help="e.g. manylinux_2_28_x86_64 (default: this machine's)")
    parser.add_argument("--python-version", default="", help="e.g. 3.12 (default: this interpreter's)")
    parser.add_argument("--torch-spec", default="torch")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    foreign = bool(args.platform or args.python_version)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheelhouse-", dir=out.parent) as scratch:
        local = Path(scratch)
        pip("download", "--dest", str(local), *requirements(args.torch_spec))
        built = build_sdists(local, out, foreign)
        if foreign:
            target = ["--only-binary=:all:", "--implementation", "cp"]
            if args.platform:
                target += ["--platform", args.platform]
            if args.python_version:
                target += ["--python-version", args.python_version]
            pip(
                "download",
                "--dest",
                str(out),
                "--find-links",
                str(out),
                *target,
                *requirements(args.torch_spec),
            )
        else:
            for wheel in local.glob("*.whl"):
                shutil.move(str(wheel), out / wheel.name)
    pip("wheel", "--no-deps", "--wheel-dir", str(out), str(PROJECT))
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(
        f"{len(wheels)} wheels, {size:.0f} MiB in {out} ({len(built)} built here from sdists: {', '.join(built)})"
    )
    print(f"install offline with: make install WHEELHOUSE={out}")


if __name__ == "__main__":
    main()
