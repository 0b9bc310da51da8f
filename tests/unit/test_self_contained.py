"""The repository stands alone: nothing in it may read a path outside it.

A user's clone has nothing beside it, so a test, script or doc that reaches for
``../something`` above the repository root (as the recorded OpenAI streams once did,
from a folder beside the repository) fails there while passing on a developer's machine. This guard
reads every tracked text file and resolves each relative path it spells out — ``../``
chains, ``Path(__file__).parents[N]``, ``.parent.parent…`` and ``ROOT.parent`` — from the file's own
folder; any that lands outside the repository fails the test with file and line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT

DOTDOT_CHAIN = re.compile(r"(?<![\w.])((?:\.\./)+)")
PARENTS_INDEX = re.compile(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent)+)\b")
# Whatever a module calls its root (ROOT, REPO_ROOT), the folder above it is outside.
ROOT_PARENT = re.compile(r"ROOT\.parent\b")
# A machine-specific absolute path is outside a clone too.
ABSOLUTE_WORKSPACE = re.compile(r"(?<![\w/])/work/")


def _tracked_text_files() -> list[tuple[Path, str]]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.decode()
    files = []
    for name in filter(None, listed.split("\0")):
        path = REPO_ROOT / name
        if not path.is_file():
            continue
        try:
            files.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue  # binary: holds no paths we could follow
    return files


def _escapes(start: Path, ups: int) -> bool:
    """Whether going ``ups`` folders up from ``start`` leaves the repository."""
    depth = len(start.relative_to(REPO_ROOT).parts)
    return ups > depth


def outside_references(path: Path, text: str) -> list[str]:
    """Each line of ``text`` (the file at ``path``) that names a path above the root."""
    folder = path.parent
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        ups = [chain.count("../") for chain in DOTDOT_CHAIN.findall(line)]
        # parents[0] is the file's folder; .parent once is the folder too.
        ups += [int(index) for index in PARENTS_INDEX.findall(line)]
        ups += [chain.count(".parent") - 1 for chain in PARENT_CHAIN.findall(line)]
        if (
            any(_escapes(folder, up) for up in ups)
            or ROOT_PARENT.search(line)
            or ABSOLUTE_WORKSPACE.search(line)
        ):
            found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    return found


def test_no_tracked_file_refers_to_a_path_outside_the_repository() -> None:
    offenders = []
    for path, text in _tracked_text_files():
        if path != Path(__file__).resolve():  # this file spells out examples on purpose
            offenders += outside_references(path, text)
    assert offenders == [], "paths outside the repository:\n" + "\n".join(offenders)


def test_the_guard_sees_each_way_of_leaving_the_root() -> None:
    here = REPO_ROOT / "tests" / "unit" / "example.py"
    leaving = [
        'FIXTURES = Path(__file__).resolve().parents[3] / "elsewhere"',
        "ROOT = Path(__file__).resolve().parent.parent.parent.parent",
        'open("../../../elsewhere/x.txt")',
        "cat /work/elsewhere/DESIGN.md",
    ]
    staying = [
        'FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"',
        "ROOT = Path(__file__).resolve().parent.parent.parent",
        'open("../../docs/CALLING.md")',
    ]
    for line in leaving:
        assert outside_references(here, line), line
    for line in staying:
        assert not outside_references(here, line), line
