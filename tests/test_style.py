"""The project's own rules: ruff-clean, CI runs exactly the README's commands, and imports run down the layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_ruff_is_clean() -> None:
    for command in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readmes_install_and_test_command() -> None:
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (REPO / "README.md").read_text()
    assert "pytest" in ci_command


# The package's layers, lowest first: a module imports only from its own layer or those below it (`stages` and
# `stages.render` count as the `stages` layer). What both the stages and the driver use, the control actor, sits
# below both; the request's own definitions (schema, plan, step cache, job config) below everything that runs.
LAYERS = [
    {"storage", "plan", "step_cache"},
    {"models"},
    {"schema"},
    {"output"},
    {"config"},
    {"control"},
    {"render"},
    {"stages"},
    {"job"},
]


def _layer(module: str) -> int:
    top = module.removeprefix("skyreels_batch.").split(".")[0]
    return next(index for index, names in enumerate(LAYERS) if top in names)


def _imports(path: Path) -> set[str]:
    """Every skyreels_batch module `path` imports, at the top or inside a function (TYPE_CHECKING too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skyreels_batch"):
            module = node.module
            names |= {f"{module}.{alias.name}" if module == "skyreels_batch" else module for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("skyreels_batch")}
    return names


def test_imports_run_down_the_layers_only() -> None:
    package = REPO / "skyreels_batch"
    upward = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module == "skyreels_batch.__init__":
            continue
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)
    assert {path.name for path in package.iterdir() if path.suffix == ".py"} == {
        "__init__.py", "storage.py", "plan.py", "step_cache.py", "schema.py", "config.py", "control.py"
    }, "a new top-level module: give it a folder by role, or a layer here"  # fmt: skip
