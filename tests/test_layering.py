"""Imports go one way: pure math -> optimizers / state readers -> rules -> engine -> adapters -> offline tools.

Each check runs in a fresh interpreter, so what a module loads is what it alone pulls in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adam_monitor"

#: What importing each module may load of this package, beyond itself and its parent packages.
ENGINE = ("adam_monitor.engine", "adam_monitor.callback", "adam_monitor.cli", "adam_monitor.integrations")
LAYERS = {
    "adam_monitor": ENGINE + ("adam_monitor.optim", "adam_monitor.alerts", "adam_monitor.diagnostics"),
    "adam_monitor.theory": ENGINE + ("adam_monitor.optim", "adam_monitor.alerts", "adam_monitor.diagnostics"),
    "adam_monitor.diagnostics": ENGINE + ("adam_monitor.optim", "adam_monitor.alerts"),
    "adam_monitor.optim": ENGINE + ("adam_monitor.alerts",),
    "adam_monitor.alerts": ENGINE + ("adam_monitor.optim",),
    "adam_monitor.engine.monitor": ("adam_monitor.callback", "adam_monitor.cli", "adam_monitor.optim"),
}
#: Frameworks no layer below the adapters loads (the engine writes through any object with add_scalar).
HEAVY = ("lightning", "pytorch_lightning", "tensorboard", "matplotlib", "transformers")


def _loaded(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_a_layer_loads_nothing_above_it(module):
    loaded = _loaded(module)
    above = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in LAYERS[module]))
    assert not above, f"importing {module} loads {above}"
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"importing {module} loads {heavy[:5]}"


def _imports(path: Path) -> set[str]:
    """The adam_monitor modules ``path`` imports at module level (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m.removesuffix(".__init__") for m in found if m.startswith("adam_monitor")}


#: Layer of each folder; a module may import its own layer and those below it.
RANK = {
    "_runtime": 0,
    "theory": 0,
    "diagnostics": 1,
    "optim": 2,
    "alerts": 3,
    "engine": 4,
    "callback": 5,
    "integrations": 5,
    "cli": 6,
}


def _rank(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        own = _rank(module)
        if own is None:
            continue
        for target in _imports(path):
            rank = _rank(target)
            if rank is not None and rank > own:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


#: Above these sizes a class or function holds more than one job: split it by what the parts are.
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 300, 100


def test_no_class_or_function_outgrows_one_job():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} > {limit}")
    assert not too_long, "\n".join(too_long)
