"""The deployment files that tests/test_deploy_configs.py (cluster.yaml, secrets, docs/deploy.md),
tests/test_deploy_kuberay.py (the KubeRay manifests, least privilege) and tests/test_deploy_netpol.py (the network
policies) read, and the pins they compare them with."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = {
    "train-rayjob.yaml": "RayJob",
    "label-rayjob.yaml": "RayJob",
    "serve-rayservice.yaml": "RayService",
}
DEPLOY_FILES = [CLUSTER_YAML, *(KUBERAY / name for name in MANIFESTS), KUBERAY / "README.md",
                ROOT / "docs" / "deploy.md"]
# Images are pinned by digest (a tag can be moved, a digest cannot). The digest is a marked placeholder
# until someone with registry access fills it in (deploy/kuberay/README.md); both forms are accepted here.
RAY_IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d+)-gpu"
                          r"@sha256:(?P<digest>[0-9a-f]{64}|<RAY_IMAGE_DIGEST>)$")
SERVICE_ACCOUNTS = {"train-rayjob.yaml": "faceattr-train", "label-rayjob.yaml": "faceattr-label",
                    "serve-rayservice.yaml": "faceattr-serve"}


def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one object, found {len(docs)}"
    return docs[0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned_ray_version() -> str:
    (ray_req,) = [d for d in _pyproject()["project"]["dependencies"] if re.match(r"ray\b", d)]
    return ray_req.split("==")[1]


def _module_file(module: str) -> Path:
    """The file of a module of this repository: ``a/b.py``, or ``a/b/__init__.py`` for a package."""
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _expected_pip() -> set[str]:
    """The project's dependencies minus Ray (the image provides it), each pinned exactly to the version the
    tests ran with (this venv's), which must satisfy pyproject.toml's range: a cluster installs what was
    tested, not whatever is newest on the day."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    out = set()
    for d in _pyproject()["project"]["dependencies"]:
        req = Requirement(d)
        if req.name == "ray":
            continue
        v = version(req.name)
        assert req.specifier.contains(v, prereleases=True), (d, v)
        out.add(f"{req.name}=={v}")
    return out
