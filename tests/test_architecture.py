"""The architecture as tests: the import contracts cover the whole core, there are no import cycles, and the
CLI's start-up imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("segfactory", "scenes", "synth", "pretrain", "finetune", "pipelines")


def _contracts() -> dict[str, dict]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in cfg["contracts"]}


def test_core_contract_names_every_core_module():
    """A new module in segfactory/ (outside the CLI) must be covered by the core contract, or it could import a
    stage unnoticed."""
    listed = set(_contracts()["core"]["source_modules"])
    core = REPO / "segfactory"
    for path in core.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[1:2] == ("cli",):
            continue
        name = ".".join(p for p in parts if p != "__init__")
        parent = name.rsplit(".", 1)[0]
        assert name in listed or f"{parent}.*" in listed, f"{name} is not in the core contract (pyproject.toml)"


def test_import_contracts_hold():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    cycles = sorted((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                    if b in graph.modules and graph.chain_exists(importer=b, imported=a))
    assert cycles == [], f"import cycles: {cycles}"


def test_cli_start_up_imports_nothing_heavy():
    code = ("import json, sys; from segfactory.cli import build_parser; build_parser(); "
            "print(json.dumps(sorted(m for m in ('torch', 'bpy', 'blenderproc', 'dask', 'distributed', 'cv2', "
            "'kornia', 'timm') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == []


def test_every_internal_import_resolves():
    """Imports inside functions are only run when the function is: check every one of them names a module that
    exists (a moved module otherwise breaks a rarely used path silently)."""
    import ast
    import importlib.util

    missing = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                for name in names:
                    if name.split(".")[0] in PACKAGES and importlib.util.find_spec(name) is None:
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert missing == []
