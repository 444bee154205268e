"""Code and docs cite the world (paper, repository, file, commit), never this project's history or the
developers' notes beside the checkout, which a clone does not have."""

from __future__ import annotations

import re
import subprocess

import pytest

from globalcom2.paths import PROJECT_ROOT

SOURCES = ("*.py", "*.md", "*.yaml", "*.toml", "Makefile", ".ci/*")


def cites_this_project(line: str) -> bool:
    """A ticket number not preceded by the project it belongs to: an upstream issue names its project
    ("FastV issue #13", "owner/repo issue 2") and is a citation of the world."""
    for match in re.finditer(r"(\S*)\s*\b[Ii]ssues?\s+#?\d+", line):
        before = match.group(1).strip("(")
        if not (before[:1].isupper() or "/" in before):
            return True
    return False


#: What no tracked source may contain: a path into the developers' notes, a ticket number of this project,
#: or a test's story ("Defect 3: ... used to be a TypeError").
FORBIDDEN = {
    "a path outside the repository": re.compile(r"\.\./shared").search,
    "a ticket number": cites_this_project,
    "a bug's history": re.compile(r"\bDefect\s+\d+\b").search,
}


def tracked_sources() -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "ls-files", "--", *SOURCES],
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in listed.stdout.splitlines() if "checkpoints/" not in name]


@pytest.mark.parametrize("kind", list(FORBIDDEN))
def test_no_tracked_source_cites_the_projects_history_or_notes(kind):
    forbidden = FORBIDDEN[kind]
    found = []
    for name in tracked_sources():
        path = PROJECT_ROOT / name
        if name == "tests/harness/test_citations.py" or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if forbidden(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert found == [], f"{kind}:\n" + "\n".join(found)


def test_the_patterns_find_what_they_forbid():
    assert FORBIDDEN["a path outside the repository"]("see ../shared/reference/x.md")
    assert cites_this_project("(issue 14, first attempt)") and cites_this_project("the targets of issue 14")
    assert not cites_this_project("FastV issue #13") and not cites_this_project("see owner/repo issue 2")
    assert FORBIDDEN["a bug's history"]("Defect 3: used to be a TypeError")
