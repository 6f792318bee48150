"""The packages import only downward (docs/architecture.md): storage, models, facedata, faces, core, raytasks,
jobs, lowest first; each may import the ones before it, never one after it, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "models", "facedata", "faces", "core", "raytasks", "jobs")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_every_package_imports_only_the_ones_below_it():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for package in LAYERS:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no package {package}/"
        for path in files:
            for line, module in _imports(path):
                top = module.split(".")[0]
                if rank.get(top, -1) > rank[package]:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
