"""requirements.lock, the image's pinned packages, covers what the project declares.

The Dockerfile installs the lock with ``pip install --require-hashes`` and our own two
packages with ``--no-deps``: a dependency added to a pyproject.toml but not to the lock
would be missing from the image (or, worse, fetched unpinned). Renew with
``scripts/lock.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT

OUR_PACKAGES = {"chatgate", "chatgate-client"}
# The image: CPython 3.11 on Linux.
IMAGE = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
         "platform_system": "Linux", "implementation_name": "cpython", "extra": ""}  # fmt: skip
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def locked() -> dict[str, tuple[str, int]]:
    """name → (version, number of hashes) for each pin in the lock."""
    pins: dict[str, tuple[str, int]] = {}
    current = ""
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if match := PIN.match(line):
            current = canonicalize_name(match[1])
            pins[current] = (match[2], 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def declared() -> list[Requirement]:
    """Every runtime and build requirement of our two packages that applies to the image."""
    requirements = []
    for pyproject in (REPO_ROOT / "pyproject.toml", REPO_ROOT / "clients/python/pyproject.toml"):
        data = tomllib.loads(pyproject.read_text())
        for text in [*data["project"]["dependencies"], *data["build-system"]["requires"]]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) in OUR_PACKAGES:
                continue
            if requirement.marker is None or requirement.marker.evaluate(IMAGE):
                requirements.append(requirement)
    return requirements


def test_every_declared_dependency_is_pinned_with_hashes() -> None:
    pins = locked()
    assert pins, "requirements.lock has no pins"
    problems = []
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement}: not in the lock")
            continue
        version, hashes = pins[name]
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: the lock pins {version}")
        if hashes == 0:
            problems.append(f"{requirement}: no hash")
    assert problems == [], "run scripts/lock.py:\n" + "\n".join(problems)


def test_every_pin_has_a_hash_and_our_packages_are_left_out() -> None:
    pins = locked()
    assert [name for name, (_, hashes) in pins.items() if hashes == 0] == []
    assert OUR_PACKAGES.isdisjoint(pins)


def test_the_documented_command_reproduces_the_lock() -> None:
    """scripts/lock.py --check: uv (a dev dependency) resolves against PyPI, keeping the
    lock's pins, and must arrive at the committed file."""
    result = subprocess.run(
        [sys.executable, "scripts/lock.py", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
