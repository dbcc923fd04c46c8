"""The floors of the code (docs/ARCHITECTURE.md): every import points down, and none goes round.

Every ``import`` statement of the project's modules is read with `ast`, those inside
functions too, so a lazy import cannot hide an upward one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("neuroscan", "prompts", "workers", "aggregator", "results", "report", "cluster", "bench")
FLOORS = {
    "neuroscan": 0,  # the ground floor: vocabulary shared by all
    "prompts": 1,  # the parts, which do not import one another
    "workers": 1,
    "aggregator": 1,
    "results": 2,  # the read side of a scan
    "report": 3,
    "cluster": 4,  # driver, scheduler, placement
    "bench": 5,  # drives the cluster's scan
    "cluster.cli": 6,  # the top: the command line
    "neuroscan.__main__": 7,  # `python -m neuroscan`, which runs it
}


FACADE = "neuroscan"
"""``neuroscan/__init__.py``: the Python API, on top, whose names load from `API` by name."""


def floor(module: str) -> int:
    """The floor of the longest prefix of ``module`` that FLOORS names (the facade: the top)."""
    if module == FACADE:
        return max(FLOORS.values())
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise KeyError(module)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, project module) for every import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            ]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def graph() -> dict[str, list[tuple[int, str]]]:
    """Every module's imports; the facade's lazily loaded names count as its imports."""
    modules = project_modules()
    found = {name: imports(path, modules) for name, path in modules.items()}
    from neuroscan import API

    found[FACADE] += [(0, module) for module in sorted({target.partition(":")[0] for target in API.values()})]
    return found


def test_every_import_points_down_or_stays_in_its_package():
    wrong = []
    for module, found in graph().items():
        for line, target in found:
            same_package = module.split(".")[0] == target.split(".")[0]
            if not same_package and floor(target) >= floor(module):
                wrong.append(f"{module}:{line} imports {target} (floor {floor(module)} -> {floor(target)})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_two_modules_import_each_other_even_through_others():
    edges = {module: {target for _, target in found if target != module} for module, found in graph().items()}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in edges.get(module, ()):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_every_module_has_a_floor():
    for module in project_modules():
        floor(module)  # raises KeyError for a package FLOORS does not place


@pytest.mark.parametrize("module", ["neuroscan.errors", "neuroscan.config", "neuroscan.messages", "neuroscan.manifest"])
def test_the_ground_floor_loads_nothing_else_of_the_project_nor_torch_or_ray(module):
    code = (
        f"import sys, {module}, neuroscan\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES[1:]!r} + ('torch', 'ray'))\n"
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_facade_is_on_top_and_imports_nothing_when_imported():
    assert floor(FACADE) > floor("cluster.cli") > floor("neuroscan.config")
    assert [target for _, target in imports(ROOT / "neuroscan" / "__init__.py", project_modules())] == []


def test_the_api_loads_its_names_on_first_use():
    code = "import neuroscan; print(neuroscan.Selection().high, neuroscan.open_run.__module__, neuroscan.run_scan.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3.0", "results.run", "cluster.driver"]


def test_an_upward_import_is_caught(tmp_path, monkeypatch):
    """The checks above fail on the mistake they exist for: a ground-floor module that
    imports the driver inside a function."""
    bad = tmp_path / "neuroscan" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from cluster.driver import run_scan\n")
    modules = {**project_modules(), "neuroscan.bad": bad}
    found = imports(bad, modules)
    assert found == [(2, "cluster.driver")] and floor("cluster.driver") > floor("neuroscan.bad")
