"""The wheels a prepared machine lacks to run the harness: ``make carry-wheels HAVE=<its pip freeze>``.

A GPU node often comes with torch, transformers and the scientific stack already installed (a CUDA
container image, a lent benchmark machine), no package index, and a limit on what can be brought along.
``make wheelhouse`` resolves every dependency, torch and its CUDA wheels included (gigabytes); this brings
only the difference:

1. **What a run imports.** Each traced command (by default one cell of the tiny model on the demo
   benchmark through each front door: ``globalcom2.run``, the path every evaluation takes through Hydra,
   lmms-eval and the plugin; and ``globalcom2.lmms``, lmms-eval's own CLI) runs here, and the top-level
   modules it imported (less those the interpreter had loaded before it started) are mapped to their
   distributions (``importlib.metadata``). A distribution that is installed but never imported on those
   paths (most of lmms-eval's declared dependencies: ``openai``, ``av``, ``yt-dlp`` …) stays behind,
   and so do the requirements that brought ones declare on such distributions.
2. **Minus what the machine has.** ``HAVE`` lists the machine's distributions (``pip list --format=freeze``
   or bare names). One it has is kept, unless its version is known and fails a requirement that this
   project or a brought-along distribution declares on it (transformers older than ``pyproject.toml``
   allows, filelock 4 under this project's ``filelock<4``, which it holds for lmms-eval): then this
   machine's version is brought. A bare name (version unknown) is kept and reported as unchecked, unless a
   requirement caps its version (filelock
   ``<4``, fsspec ``<=2026.9.0`` under datasets): a machine newer than the cap would fail ``--verify``
   there and lose the main path for want of a few kilobytes, so it is brought. Requirements behind extras
   are not followed.
3. **Downloaded for the target** (``--platform`` with ``--python-version``) at the versions installed here,
   the ones the tests pass with: ``pip download --no-deps --only-binary=:all:`` (the target has no index,
   so nothing may be resolved there). A distribution with no wheel on the index is built here, and refused
   for another target unless it is pure Python.

Install there into a fresh folder (``pip install --target`` into a used one keeps an older version's
metadata beside the new, and ``--verify`` would read the wrong one), check, and run from the checkout::

    rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site CARRY_DIR/*.whl
    PYTHONPATH=.:/tmp/site python3 globalcom2/carry.py --verify CARRY_DIR
    PYTHONPATH=.:/tmp/site python3 -m globalcom2.perf.gpu_checklist --carried CARRY_DIR ...

``--verify`` reads ``CARRY_DIR/carry.json`` (written beside the wheels): every distribution the traced path
imports, with the requirements declared on it, and checks the versions Python sees there. It is run by path
and imports nothing of the package, so it needs neither the package nor an importable transformers (which
refuses to import with some of the very mismatches it should list). It checks what the harness imports, not
the machine's other packages: those the traced paths never import are not run with the carried wheels. A
bare name in ``HAVE`` whose version fails there is brought along by deleting it from ``HAVE``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # not globalcom2.paths: --verify imports no package module
PROJECT_DISTRIBUTION = "globalcom2-harness"
MANIFEST = "carry.json"  # {distribution: [specifier, ...]}, written beside the wheels
#: Run as ``python -c``: the command's module under ``runpy``; at exit, every top-level name it imported.
_TRACER = """
import atexit, json, runpy, sys
out, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
before = set(sys.modules)  # the interpreter's own start-up (site, a venv's _distutils_hack): not the command's
atexit.register(lambda: open(out, "w").write(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before}))))
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Carried:
    name: str  # canonical distribution name
    version: str  # installed here: the one downloaded
    why: str  # "missing" or the requirement the machine's version fails


def default_commands(results_dir: Path) -> list[list[str]]:
    """One tiny cell through each front door, in a scratch folder: the main path (``globalcom2.run`` ->
    lmms-eval -> plugin), then lmms-eval's own CLI with the plugin (``globalcom2.lmms``), which imports what
    the first does not (``pytablewriter`` and its dependencies, for the results table it prints). The first
    generates the demo data the second reads."""
    return [
        [
            "globalcom2.run",
            "model=tiny",
            "benchmark=demo",
            "benchmark.limit=1",
            "benchmark.gen_kwargs='max_new_tokens=2'",
            "method=globalcom2",
            "method.retention_ratio=0.25",
            f"paths.results_dir={results_dir}",
        ],
        [
            *("globalcom2.lmms", "--model", "globalcom2_llava_next"),
            *("--model_args", "pretrained=tiny,method=globalcom2,retention_ratio=0.25"),
            *("--tasks", "globalcom2_demo", "--limit", "1", "--gen_kwargs", "max_new_tokens=2"),
            *("--output_path", str(results_dir / "lmms_cli"), "--timezone", "UTC"),
        ],
    ]


def imported_modules(command: list[str]) -> set[str]:
    """The top-level modules ``python -m <command>`` imports, run here in its own process.

    Raises:
        SystemExit: the command failed (its output is above): a path that fails here proves nothing.
    """
    with tempfile.TemporaryDirectory(prefix="carry-trace-") as scratch:
        out = Path(scratch) / "modules.json"
        done = subprocess.run(
            [sys.executable, "-c", _TRACER, str(out), *command], cwd=PROJECT_ROOT, check=False
        )
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"traced command failed (exit {done.returncode}): python -m {' '.join(command)}")
        return set(json.loads(out.read_text()))


def distributions_of(modules: set[str]) -> tuple[set[str], set[str]]:
    """``(distributions, unclaimed)``: the installed distributions (canonical names) that provide ``modules``,
    the project itself excluded, and the modules outside the standard library that none claims."""
    providers = metadata.packages_distributions()
    names = {canonicalize_name(dist) for module in modules for dist in providers.get(module, [])}
    # Private top-level names are extension internals (scipy's _csparsetools, Cython's _cython_3_*), not packages.
    unclaimed = {
        m
        for m in modules - set(providers)
        if m not in sys.stdlib_module_names
        and not m.startswith("_")
        and m not in ("globalcom2", "cython_runtime")
    }
    return names - {PROJECT_DISTRIBUTION}, unclaimed


def parse_have(text: str) -> dict[str, Version | None]:
    """``pip list --format=freeze`` / ``pip freeze`` text (or bare names, one per line) as
    ``{canonical name: version or None}``. ``name @ url`` and ``-e …#egg=name`` lines are present at an
    unknown version; comments, blank lines and other options are skipped."""
    have: dict[str, Version | None] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):  # -e git+https://…#egg=name, or an option such as --index-url
            if "#egg=" in line:
                have[canonicalize_name(line.split("#egg=", 1)[1].split("&")[0])] = None
            continue
        if " @ " in line:
            have[canonicalize_name(line.split(" @ ", 1)[0])] = None
            continue
        name, _, version = line.partition("==")
        try:
            have[canonicalize_name(name.strip())] = Version(version.strip()) if version else None
        except InvalidVersion:
            have[canonicalize_name(name.strip())] = None
    return have


def requirements_on(
    names: set[str], requires: dict[str, list[str]], environment: dict[str, str]
) -> dict[str, list[Requirement]]:
    """``{name: the requirements that distributions in requires' keys declare on it}`` for ``names`` only,
    markers evaluated for ``environment`` (the target's Python) without extras."""
    found: dict[str, list[Requirement]] = {}
    for declared in requires.values():
        for text in declared:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate(
                {**environment, "extra": ""}
            ):
                continue
            name = canonicalize_name(requirement.name)
            if name in names:
                found.setdefault(name, []).append(requirement)
    return found


def caps_versions(requirement: Requirement) -> bool:
    """Whether ``requirement`` refuses some version newer than every one it allows (``<``, ``<=``, ``==``,
    ``===``, ``~=``): a machine's newer release can fail it, where a lower bound is what an up-to-date image
    already meets."""
    return any(spec.operator in ("<", "<=", "==", "===", "~=") for spec in requirement.specifier)


def select(
    needed: set[str],
    have: dict[str, Version | None],
    versions: dict[str, str],
    requires: dict[str, list[str]],
    environment: dict[str, str],
    project_requires: list[str],
) -> tuple[list[Carried], dict[str, list[Requirement]]]:
    """What to bring: each needed distribution the machine lacks, and each it has at a version that fails a
    requirement of the project or of a brought distribution (to a fixed point: bringing one can add
    requirements, and nothing brought is ever dropped, so it ends). Returns ``(carried, the requirements
    on every needed name from the project and the carried)``.

    Args:
        needed: canonical names of the distributions the traced commands import.
        have: the machine's distributions (:func:`parse_have`).
        versions: ``{name: version installed here}`` for every needed name.
        requires: ``{name: its Requires-Dist lines}`` for every needed name.
        environment: the target's marker environment.
        project_requires: this project's own Requires-Dist lines.
    """
    carried: dict[str, str] = {name: "missing" for name in needed if name not in have}
    while True:
        declaring = {PROJECT_DISTRIBUTION: project_requires, **{n: requires.get(n, []) for n in carried}}
        constraints = requirements_on(needed, declaring, environment)
        failing = {}
        for name in sorted(needed - set(carried)):
            version = have[name]
            if version is None:
                capped = [str(r) for r in constraints.get(name, []) if caps_versions(r)]
                if capped:
                    failing[name] = f"the machine's version is unknown; {', '.join(capped)} caps it"
                continue
            failed = [
                str(r)
                for r in constraints.get(name, [])
                if not r.specifier.contains(version, prereleases=True)
            ]
            if failed:
                failing[name] = f"the machine has {version}; needs {', '.join(failed)}"
        if not failing:
            return [Carried(n, versions[n], why) for n, why in sorted(carried.items())], constraints
        carried.update(failing)


#: The manifest's entry for the interpreter itself (no distribution is called that: PyPI reserves the name).
PYTHON = "python"


def manifest(
    needed: set[str], carry: list[Carried], constraints: dict[str, list[Requirement]], python_version: str
) -> dict[str, list[str]]:
    """``{name: specifiers}`` that must hold where the wheels are installed: each carried distribution at its
    exact version, each kept one under what the project and the carried distributions declare on it, and
    the interpreter (:data:`PYTHON`) at the ``major.minor`` the wheels were chosen for."""
    checks = {name: sorted({str(r.specifier) for r in constraints.get(name, [])}) for name in sorted(needed)}
    checks.update({c.name: [f"=={c.version}"] for c in carry})
    checks[PYTHON] = [f"=={'.'.join(python_version.split('.')[:2])}.*"]
    return checks


def verify(checks: dict[str, list[str]], path: list[str] | None = None) -> list[str]:
    """What fails in this environment: the interpreter not the Python the wheels were chosen for, each
    distribution missing, at a version outside a specifier, or with
    two metadata folders in one ``sys.path`` entry (``pip install --target`` into a used folder), where the
    version read need not be the code imported."""
    problems = []
    for name, specifiers in sorted(checks.items()):
        try:
            text = platform.python_version() if name == PYTHON else metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        try:
            version = Version(text)
        except InvalidVersion:
            problems.append(f"{name} {text}: not a version that can be checked")
            continue
        failed = [s for s in specifiers if s and not SpecifierSet(s).contains(version, prereleases=True)]
        if failed:
            problems.append(f"{name} {version}: needs {', '.join(failed)}")
    for entry in sys.path if path is None else path:
        folder = Path(entry or ".")
        if not folder.is_dir():
            continue
        found: dict[str, list[str]] = {}
        for info in folder.glob("*.dist-info"):
            found.setdefault(canonicalize_name(info.name.split("-", 1)[0]), []).append(info.name)
        problems += [
            f"{name}: {len(infos)} versions installed in {folder} ({', '.join(sorted(infos))}); install into "
            "a fresh folder"
            for name, infos in sorted(found.items())
            if name in checks and len(infos) > 1
        ]
    return problems


def target_environment(python_version: str | None) -> dict[str, str]:
    """The marker environment of the target: this interpreter's, with its Python version if one is given."""
    environment = dict(default_environment())
    if python_version:
        environment["python_version"] = ".".join(python_version.split(".")[:2])
        environment["python_full_version"] = (
            python_version if python_version.count(".") == 2 else f"{python_version}.0"
        )
    return environment


def download(carry: list[Carried], out: Path, platforms: list[str], python_version: str | None) -> None:
    """Each carried distribution's wheel at its version into ``out``; one with no wheel is built here (for
    another target only if the result is pure Python; otherwise what was built is removed and it stops)."""
    foreign = bool(platforms or python_version)
    # wheels only, for this machine too: `pip download` would otherwise fetch an sdist that --target cannot use
    target = ["--only-binary=:all:", *(["--implementation", "cp"] if foreign else [])]
    for tag in platforms:
        target += ["--platform", tag]
    if python_version:
        target += ["--python-version", python_version]
    for item in carry:
        pin = f"{item.name}=={item.version}"
        got = _pip("download", "--no-deps", "--dest", str(out), *target, pin)
        if got.returncode == 0:
            continue
        before = set(out.iterdir())
        built = _pip("wheel", "--no-deps", "--wheel-dir", str(out), pin)
        new = sorted(set(out.iterdir()) - before)
        platform_wheels = [w.name for w in new if not w.name.endswith("-none-any.whl")]
        if built.returncode == 0 and new and not (foreign and platform_wheels):
            continue
        for path in new:
            path.unlink()
        raise SystemExit(
            f"no wheel of {pin} for the target: {got.stderr.strip()[-1500:]}\n"
            + (
                f"built here, it is a platform wheel ({platform_wheels[0]})"
                if platform_wheels
                else built.stderr[-1500:]
            )
            + "\nupgrade it here to a version with a wheel for the target, or add the target's --platform tag"
        )


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pip -q <args>``, echoed; the result is the caller's to judge."""
    command = [sys.executable, "-m", "pip", "-q", *args]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> list[Carried]:
    """Trace, select, download and write the manifest (or, with ``--verify``, check this environment)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--have", type=Path, help="the machine's `pip list --format=freeze`")
    parser.add_argument("--verify", type=Path, help="check this environment against DIR/carry.json, and exit")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / ".whl")
    parser.add_argument(
        "--platform", action="append", default=[], help="repeatable, e.g. manylinux_2_28_x86_64"
    )
    parser.add_argument("--python-version", default=None, help="the target's, e.g. 3.12 (with --platform)")
    parser.add_argument("--trace", action="append", default=[], help="a command to trace, `module arg ...`")
    args = parser.parse_args(argv)
    if args.verify is not None:
        problems = verify(json.loads((args.verify / MANIFEST).read_text()))
        print(
            "\n".join(problems)
            if problems
            else f"every distribution of {args.verify / MANIFEST} is as required"
        )
        raise SystemExit(1 if problems else 0)
    if args.have is None:
        parser.error(
            "--have FILE (the target's `pip list --format=freeze`) is required unless --verify is given"
        )
    if args.platform and not args.python_version:
        parser.error("--platform needs --python-version (the target's): wheels and markers depend on it")
    from globalcom2.atomic import atomic_write_json  # the package is importable here, where wheels are made

    have = parse_have(args.have.read_text())
    with tempfile.TemporaryDirectory(prefix="carry-results-") as scratch:
        commands = [shlex.split(t) for t in args.trace] or default_commands(Path(scratch))
        modules = set().union(*(imported_modules(c) for c in commands))
    needed, unclaimed = distributions_of(modules)
    versions = {n: metadata.version(n) for n in needed}
    requires = {n: metadata.requires(n) or [] for n in needed}
    project_requires = metadata.requires(PROJECT_DISTRIBUTION) or []
    carry, constraints = select(
        needed, have, versions, requires, target_environment(args.python_version), project_requires
    )
    local = [f"{c.name}=={c.version}" for c in carry if Version(c.version).local]
    if local:  # a local build (torch 2.13.0+cpu) is on no index: the machine must bring its own
        raise SystemExit(
            f"cannot bring {', '.join(local)}: a local build, on no index; install it there first"
        )
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.whl"), *out.glob("*.tar.gz"), *out.glob("*.zip"), out / MANIFEST]:
        stale.unlink(missing_ok=True)  # one version of each, and no manifest of another run's wheels
    download(carry, out, args.platform, args.python_version)
    target_python = args.python_version or platform.python_version()
    atomic_write_json(out / MANIFEST, manifest(needed, carry, constraints, target_python))
    for item in carry:
        print(f"  {item.name}=={item.version}: {item.why}")
    unchecked = sorted(n for n in needed - {c.name for c in carry} if have[n] is None)
    if unchecked:
        print(
            f"kept without a version to check ({len(unchecked)}; --verify checks them there): {', '.join(unchecked)}"
        )
    if unclaimed:
        print(f"imported modules no distribution claims (not brought): {', '.join(sorted(unclaimed))}")
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {out} for {len(needed)} imported distributions")
    print(
        f"install there: rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile "
        f"--target /tmp/site "
        f"{out.name}/*.whl; then PYTHONPATH=.:/tmp/site python3 globalcom2/carry.py --verify {out.name}"
    )
    return carry


if __name__ == "__main__":
    main()
