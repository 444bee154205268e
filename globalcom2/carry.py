"""The wheels a prepared machine lacks to run the harness: ``make carry-wheels HAVE=<its pip freeze>``.

A GPU node often comes with torch, transformers and the scientific stack already installed (a CUDA
container image, a lent benchmark machine), no package index, and a limit on what can be brought along.
``make wheelhouse`` resolves every dependency, torch and its CUDA wheels included (gigabytes); this brings
only the difference:

1. **What a run imports.** Each traced command (by default one ``globalcom2.run`` cell of the tiny model
   on the demo benchmark, the path every evaluation takes: Hydra, lmms-eval, the plugin) runs here, and the
   top-level modules it imported are mapped to their distributions (``importlib.metadata``). A
   distribution that is installed but never imported on that path (most of lmms-eval's declared
   dependencies: ``openai``, ``av``, ``yt-dlp`` …) is not brought along.
2. **Minus what the machine has.** ``HAVE`` lists the machine's distributions (``pip list --format=freeze``
   or bare names). One it has is kept, unless its version is known and fails a requirement that this
   project or a brought-along distribution declares on it (transformers older than ``pyproject.toml``
   allows): then this machine's version is brought. A bare name (version unknown) is kept and reported as
   unchecked.
3. **Downloaded for the target** (``--platform``, ``--python-version``) at the versions installed here, the
   ones the tests pass with: ``pip download --no-deps --only-binary=:all:``. A distribution with no wheel on
   the index is built here, and refused for another target unless it is pure Python.

Install there without an index, check, and run from the checkout::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site CARRY_DIR/*.whl
    PYTHONPATH=.:/tmp/site python3 -m globalcom2.carry --verify CARRY_DIR
    PYTHONPATH=.:/tmp/site python3 -m globalcom2.perf.gpu_checklist ...

``--verify`` reads ``CARRY_DIR/carry.json`` (written beside the wheels): every distribution the traced path
imports, with the requirements declared on it. There it checks the versions Python actually sees, so a
machine whose listed versions were wrong or unknown fails in seconds, naming the distribution, instead of
minutes into a run. A bare name in ``HAVE`` whose version fails there is brought along by deleting it
from ``HAVE``.

Installing with ``--no-deps`` is what makes step 1 sound: nothing else is pulled in, so the traced path is
exactly what must import.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from globalcom2.atomic import atomic_write_json
from globalcom2.paths import PROJECT_ROOT

PROJECT_DISTRIBUTION = "globalcom2-harness"
#: Run as ``python -c``: the command's module under ``runpy``, then, at exit, every imported top-level name.
_TRACER = """
import atexit, json, runpy, sys
out, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted({m.split(".")[0] for m in sys.modules}))))
sys.argv = [module, *argv]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Carried:
    name: str  # canonical distribution name
    version: str  # installed here: the one downloaded
    why: str  # "missing" or the requirement the machine's version fails


def default_commands(results_dir: Path) -> list[list[str]]:
    """One tiny cell through the main path (``globalcom2.run`` -> lmms-eval -> plugin), in a scratch store."""
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
        ]
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


def distributions_of(modules: set[str]) -> set[str]:
    """The installed distributions (canonical names) that provide ``modules``; the project itself excluded."""
    providers = metadata.packages_distributions()
    names = {canonicalize_name(dist) for module in modules for dist in providers.get(module, [])}
    return names - {PROJECT_DISTRIBUTION}


def parse_have(text: str) -> dict[str, Version | None]:
    """``pip list --format=freeze`` / ``pip freeze`` text (or bare names, one per line) as
    ``{canonical name: version or None}``; comments, blank lines and editable or URL installs are skipped."""
    have: dict[str, Version | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-") or " @ " in line:
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
    """``{name: the requirements that distributions in requires' keys declare on it}``, markers evaluated for
    ``environment`` (the target's Python) without extras."""
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


def select(
    needed: set[str],
    have: dict[str, Version | None],
    versions: dict[str, str],
    requires: dict[str, list[str]],
    environment: dict[str, str],
    project_requires: list[str],
) -> tuple[list[Carried], list[str]]:
    """What to bring: each needed distribution the machine lacks, and each it has at a version that fails a
    requirement of the project or of a brought distribution (to a fixed point: bringing one can add
    requirements). Returns ``(carried, kept names whose version is unknown and so unchecked)``.

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
        changed = False
        for name in sorted(needed - set(carried)):
            version = have[name]
            failed = [
                str(r)
                for r in constraints.get(name, [])
                if version is not None and not r.specifier.contains(version, prereleases=True)
            ]
            if failed:
                carried[name] = f"the machine has {version}; needs {', '.join(failed)}"
                changed = True
        if not changed:
            break
    unchecked = sorted(n for n in needed - set(carried) if have[n] is None)
    return [Carried(n, versions[n], why) for n, why in sorted(carried.items())], unchecked


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
    """Each carried distribution's wheel at its version into ``out``; one with no wheel is built here."""
    foreign = bool(platforms or python_version)
    # wheels only, for this machine too: `pip download` would otherwise fetch an sdist that --target cannot use
    target = ["--only-binary=:all:", *(["--implementation", "cp"] if foreign else [])]
    for platform in platforms:
        target += ["--platform", platform]
    if python_version:
        target += ["--python-version", python_version]
    for item in carry:
        pin = f"{item.name}=={item.version}"
        got = _pip("download", "--no-deps", "--dest", str(out), *target, pin)
        if got.returncode == 0:
            continue
        before = set(out.glob("*.whl"))
        built = _pip("wheel", "--no-deps", "--wheel-dir", str(out), pin)
        new = sorted(set(out.glob("*.whl")) - before)
        if built.returncode != 0 or not new:
            raise SystemExit(
                f"no wheel of {pin} for the target, and building one failed:\n{built.stderr[-2000:]}"
            )
        if foreign and not all(w.name.endswith("-none-any.whl") for w in new):
            raise SystemExit(
                f"{pin} has no wheel for the target and builds a platform wheel here ({new[0].name})"
            )


MANIFEST = "carry.json"


def manifest(
    needed: set[str],
    carry: list[Carried],
    requires: dict[str, list[str]],
    environment: dict[str, str],
    project_requires: list[str],
) -> dict[str, list[str]]:
    """``{name: requirement specifiers}`` that must hold where the wheels are installed: the carried at their
    exact version, every kept one under what the project and the carried distributions declare on it."""
    declaring = {PROJECT_DISTRIBUTION: project_requires, **{c.name: requires.get(c.name, []) for c in carry}}
    constraints = requirements_on(needed, declaring, environment)
    checks = {name: sorted({str(r.specifier) for r in constraints.get(name, [])}) for name in sorted(needed)}
    checks.update({c.name: [f"=={c.version}"] for c in carry})
    return checks


def verify(checks: dict[str, list[str]]) -> list[str]:
    """What fails in this environment: each distribution missing, or at a version outside a specifier."""
    from packaging.specifiers import SpecifierSet

    problems = []
    for name, specifiers in sorted(checks.items()):
        try:
            version = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        failed = [s for s in specifiers if s and not SpecifierSet(s).contains(version, prereleases=True)]
        if failed:
            problems.append(f"{name} {version}: needs {', '.join(failed)}")
    return problems


def _pip(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "-q", *args]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> list[Carried]:
    """Trace, select, download and write the manifest (or, with ``--verify``, check an environment)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--have", type=Path, help="the machine's `pip list --format=freeze`")
    parser.add_argument("--verify", type=Path, help="check this environment against DIR/carry.json, and exit")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / ".whl")
    parser.add_argument(
        "--platform", action="append", default=[], help="repeatable, e.g. manylinux_2_28_x86_64"
    )
    parser.add_argument("--python-version", default=None, help="the target's, e.g. 3.12")
    parser.add_argument(
        "--trace", action="append", default=[], help="a command to trace, as `module arg ...` (repeatable)"
    )
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
    have = parse_have(args.have.read_text())
    with tempfile.TemporaryDirectory(prefix="carry-results-") as scratch:
        commands = [t.split() for t in args.trace] or default_commands(Path(scratch))
        modules = set().union(*(imported_modules(c) for c in commands))
    needed = distributions_of(modules)
    versions = {n: metadata.version(n) for n in needed}
    requires = {n: metadata.requires(n) or [] for n in needed}
    project_requires = metadata.requires(PROJECT_DISTRIBUTION) or []
    environment = target_environment(args.python_version)
    carry, unchecked = select(needed, have, versions, requires, environment, project_requires)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.whl"), *out.glob("*.tar.gz"), *out.glob("*.zip")]:
        stale.unlink()  # one version of each, and nothing the path does not need: two stop the install
    download(carry, out, args.platform, args.python_version)
    checks = manifest(needed, carry, requires, environment, project_requires)
    atomic_write_json(out / MANIFEST, checks)
    wheels = sorted(out.glob("*.whl"))
    for item in carry:
        print(f"  {item.name}=={item.version}: {item.why}")
    if unchecked:
        print(f"kept without a version to check ({len(unchecked)}): {', '.join(unchecked)}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {out} for {len(needed)} imported distributions")
    print(
        f"install there: python3 -m pip install -q --no-index --no-deps --target /tmp/site {out.name}/*.whl"
    )
    return carry


if __name__ == "__main__":
    main()
