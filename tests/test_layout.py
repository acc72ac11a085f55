"""The package's layers (README "Where things are"): which subpackage may import which.

    base (study/*.py: config, schema, store, ...)   imports no subpackage at module level
    study.trainer    base only
    study.analysis   base, and study.sweeps.spec alone (which runs a sweep file plans:
                     what a store should hold); never the trainer, torch, gymnasium, numba
    study.sweeps     base, the trainer, the analysis (objectives, seed tables)
    study.report     base, the analysis, study.sweeps.spec; the trainer only inside
                     study.report.render's functions (replaying a stored policy needs it)

Entry modules (``python -m study.grid`` ...) may import anything. Checked on the source
(every import statement, also those inside functions) and at run time (importing every
analysis and report module loads no torch, gymnasium or numba).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "study"
LAYERS = ("trainer", "sweeps", "analysis", "report")
HEAVY = ("torch", "gymnasium", "numba", "ale_py", "minatar", "mujoco", "envpool")
ENTRIES = {"grid", "optuna", "train", "tables", "failures", "aggregate", "render"}

#: layer -> the layers it may import (itself and base always)
ALLOWED = {
    "base": set(),
    "trainer": set(),
    "analysis": {"sweeps.spec"},
    "sweeps": {"trainer", "analysis"},
    "report": {"analysis", "sweeps.spec"},
}
#: (module, imported layer): allowed inside functions only, with the reason
LAZY_ONLY = {
    ("study.report.render", "trainer"): "replays a stored policy with the trainer's network",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "entry" if len(parts) == 2 and parts[1] in ENTRIES else "base"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) of every import statement in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top))
            found += [(f"{node.module}.{a.name}", node.lineno, id(node) in top)
                      for a in node.names]
    return found


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The study module (or subpackage) ``name`` refers to, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_module_imports_a_layer_it_may_not():
    modules = _modules()
    bad = []
    for module, path in sorted(modules.items()):
        layer = _layer(module)
        if layer == "entry":
            continue
        for name, line, at_top in _imports(path):
            root = name.split(".")[0]
            if root in HEAVY and layer in ("analysis", "report", "base"):
                if (module, "trainer") in LAZY_ONLY and not at_top:
                    continue
                if layer == "base" and not at_top:
                    continue  # base modules may load them on demand (e.g. a CLI's --help)
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
                continue
            target = _target(name, modules) if root == "study" else None
            if target is None:
                continue
            other = _layer(target)
            if other in ("base", layer):
                continue
            allowed = ALLOWED[layer]
            if other in allowed or any(target == f"study.{a}" or target.startswith(f"study.{a}.")
                                       for a in allowed):
                continue
            if (module, other) in LAZY_ONLY and not at_top:
                continue
            if layer == "base" and not at_top and other != "entry":
                continue  # e.g. study.trust: what it checks is loaded when it is called
            bad.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {name} ({other})")
    assert not bad, "imports across layers:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    # The rule above is only as good as its parser: an analysis module importing the
    # trainer inside a function must be caught.
    fake = tmp_path / "mod.py"
    fake.write_text("def f():\n    from study.trainer.population import Member\n    import torch\n")
    names = {(n, top) for n, _, top in _imports(fake)}
    assert ("study.trainer.population", False) in names and ("torch", False) in names
    assert _layer("study.trainer.population") == "trainer"
    assert _target("study.trainer.population.Member", _modules()) == "study.trainer.population"


@pytest.mark.parametrize("group", ["analysis", "report", "base"])
def test_importing_the_readers_loads_no_trainer(group):
    modules = [m for m in _modules() if _layer(m) == group and not m.endswith("__main__")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}"
            " or m.startswith('study.trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]", f"importing {group} loaded: {out}"


def test_the_package_states_its_public_api_and_loads_it_lazily():
    code = ("import sys, study\n"
            "light = not any(m in sys.modules for m in ('torch', 'gymnasium', 'numba'))\n"
            "names = [n for n in study.__all__ if getattr(study, n, None) is None]\n"
            "print(light, names, callable(study.train_population), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split(maxsplit=1)
    # light before first use; every public name resolves; using one loads what it needs
    assert out[0] == "True" and out[1].strip() == "[] True True", out
