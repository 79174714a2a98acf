"""The layering rules of the README's layout section, read from the imports themselves."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import tomllib

from framework.comm import registry

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included).

    ``from pkg import name`` also counts ``pkg.name`` when that is a module of ours (so
    ``from framework import model`` is an import of ``framework.model``); relative imports are
    resolved against the file's package."""
    out: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.add(module)
            for a in node.names:
                sub = f"{module}.{a.name}"
                if (ROOT / sub.replace(".", "/")).is_dir() or (
                    ROOT / (sub.replace(".", "/") + ".py")
                ).is_file():
                    out.add(sub)
    return out


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def ours(mods: set[str]) -> set[str]:
    return {m for m in mods if m.split(".")[0] in ("framework", "strategies", "experiments")}


def test_the_import_reader_sees_nested_relative_and_module_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("framework/run/spec.py", "framework/model/__init__.py", "strategies/naive.py"):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text("")
    f = tmp_path / "strategies" / "probe.py"
    f.write_text(
        "import os\ndef g():\n    from framework.run import spec\n"
        "from framework import model, Algorithm\nfrom . import naive\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported_modules(f) == {
        "os",
        "framework.run",
        "framework.run.spec",
        "framework",
        "framework.model",
        "strategies",
        "strategies.naive",
    }


@pytest.mark.parametrize("path", files("framework/comm"), ids=lambda p: p.name)
def test_comm_imports_nothing_else_of_framework(path: Path) -> None:
    bad = {m for m in ours(imported_modules(path)) if not m.startswith("framework.comm")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", files("framework/model"), ids=lambda p: p.name)
def test_model_imports_neither_comm_nor_run(path: Path) -> None:
    bad = {m for m in ours(imported_modules(path)) if not m.startswith("framework.model")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", files("framework"), ids=lambda p: str(p.relative_to(ROOT)))
def test_framework_imports_neither_experiments_nor_strategies(path: Path) -> None:
    bad = {m for m in ours(imported_modules(path)) if m.split(".")[0] != "framework"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_costmodel_is_pure() -> None:
    mods = set().union(*(imported_modules(p) for p in (ROOT / "framework/costmodel").glob("*.py")))
    assert not {
        m
        for m in mods
        if m.startswith(("torch.distributed", "framework.run", "framework.comm", "lightning"))
    }, mods


@pytest.mark.parametrize("path", files("strategies"), ids=lambda p: p.name)
def test_strategies_import_only_the_plugin_api(path: Path) -> None:
    # a strategy may extend another built-in one (adaptive_threshold extends bucketed)
    allowed = ("framework.comm", "strategies")
    bad = {
        m for m in ours(imported_modules(path)) if m != "framework" and not m.startswith(allowed)
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


_PROBE = """
import json, sys
{stmt}
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("framework", "strategies", "lightning", "hydra"))))
"""


def loaded_after(stmt: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(stmt=stmt)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return set(json.loads(out))


def test_import_weights() -> None:
    """framework and framework.comm stay light; framework.model loads no comm and no run."""
    light = loaded_after("import framework, framework.comm")
    assert "framework.comm.communicator" in light  # the probe sees what it loads
    assert not {
        m
        for m in light
        if m.startswith(("framework.model", "framework.run", "lightning", "hydra", "strategies"))
    }, light
    model = loaded_after("import framework.model")
    assert "framework.model.llama" in model
    assert not {
        m for m in model if m.startswith(("framework.comm", "framework.run", "lightning"))
    }, model
    lazy = loaded_after("from framework import get_strategy; get_strategy('tree')")
    assert {m for m in lazy if m.startswith("strategies.")} == {"strategies.tree"}, lazy


def test_entry_points_files_and_configs_name_the_same_strategies() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    declared = set(declared["commlab.strategies"])
    installed = {
        ep.name
        for ep in entry_points(group=registry.ENTRY_POINT_GROUP)
        if ep.value.startswith("strategies.")
    }
    modules = {p.stem for p in (ROOT / "strategies").glob("*.py")} - {"__init__"}
    configs = {p.stem for p in (ROOT / "conf/strategy").glob("*.yaml")}
    assert declared == modules == configs, (declared, modules, configs)
    assert installed == declared, "installed metadata is stale: pip install -e . again"


def test_a_broken_plugin_is_named_and_hides_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.discover()
    broken = EntryPoint(
        name="broken_plugin", value="commlab_no_such_module", group=registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setitem(registry._EPS, "broken_plugin", broken)
    monkeypatch.setattr(registry, "_FAILED", {})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        names = registry.available_strategies()
    assert "broken_plugin" not in names
    assert set(names) >= set(registry._EPS) - {"broken_plugin"}
    assert any("broken_plugin" in str(w.message) for w in seen)
    with pytest.raises(
        ValueError,
        match=r"broken_plugin \(commlab_no_such_module: "
        r"ModuleNotFoundError",
    ):
        registry.get_strategy("no_such_strategy")
    assert registry.get_strategy("naive").name == "naive"  # the others still load
