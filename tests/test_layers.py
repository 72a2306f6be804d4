"""The package's layers (docs/ARCHITECTURE.md): a module imports from its own layer or below, never from above.

Every ``import`` / ``from ... import`` of a workbench module is read from the source (module level and
inside functions alike), so a lazy import that runs back up a layer is caught too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"

#: layer of each top-level module or subpackage of ``workbench`` (docs/ARCHITECTURE.md, "Modules")
LAYERS: dict[str, int] = {
    "errors": 1, "device": 1, "paths": 1, "console": 1, "numerics": 1, "cpu_kernels": 1, "task_vectors": 1,
    "io": 2,
    "merging": 3, "llava": 3, "families": 3, "config": 3,
    "engine": 4, "routing": 4, "mllm": 4, "statistics": 4, "evaluate": 4,
    "world": 5, "analysis": 5, "compose": 5,
    "studies": 6, "plots": 6, "explorers": 6, "cli": 6, "profile_cli": 6, "reproduce": 6, "tiny": 6,
    "__main__": 6, "__init__": 6,
}


def _unit(parts: list[str]) -> str:
    """``["workbench", "io", "reader"]`` -> ``"io"`` (the top-level module or subpackage)."""
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported top-level unit)`` of every workbench import in ``path``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = list(rel if path.name == "__init__.py" else rel[:-1])
    if path.name == "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                out.append((node.lineno, _unit(base + node.module.split("."))))
            else:  # from . import x, y
                out.extend((node.lineno, _unit(base + [a.name])) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "workbench":
            out.append((node.lineno, _unit(node.module.split("."))))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, _unit(a.name.split("."))) for a in node.names
                       if a.name.split(".")[0] == "workbench")
    return out


def test_every_module_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units <= set(LAYERS), f"modules without a layer: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_up_a_layer(path):
    unit = _unit(list(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    own = LAYERS[unit]
    upward = [f"line {line}: {unit} (layer {own}) imports {target} (layer {LAYERS[target]})"
              for line, target in _imports(path) if target in LAYERS and LAYERS[target] > own]
    assert not upward, f"{path}: " + "; ".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a lazy import of a higher layer inside a function is reported."""
    fake = PACKAGE / "io" / "_layer_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "def f():\n    from ..studies import cache\n"
                        if self == fake else Path.read_bytes(self).decode())
    assert _imports(fake) == [(2, "studies")]
