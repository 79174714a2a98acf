"""An out-of-tree plugin, taken verbatim from the README, pip-installed into a temp dir."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import first_only

ROOT = Path(__file__).resolve().parents[2]


def readme_plugin_files() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- plugin: (\S+) -->\n```\w+\n(.*?)```", text, re.S)
    return dict(blocks)


def discover_and_check(site: str) -> list[str]:
    """On a rank: make the installed plugin visible, rediscover, run the whole kit on it."""
    sys.path.insert(0, site)
    from framework.comm.registry import available_strategies, discover
    from framework.testing import run_checks

    discover(force=True)
    if "gather_sum" not in available_strategies():
        raise AssertionError(f"plugin not discovered: {available_strategies()}")
    return run_checks("gather_sum", {"max_bytes": 65536})


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> str:
    files = readme_plugin_files()
    assert set(files) == {"commlab_gather_sum.py", "pyproject.toml"}
    pkg = tmp_path_factory.mktemp("pkg")
    for name, body in files.items():
        (pkg / name).write_text(body)
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(pkg),
        ],
        check=True,
        timeout=300,
    )
    assert list(site.glob("commlab_gather_sum-*.dist-info/entry_points.txt"))
    return str(site)


@pytest.mark.parametrize("world_size", first_only([2, 1, 3]))
def test_plugin_discovered_and_conformant(pools, installed_plugin: str, world_size: int) -> None:
    passed = pools(world_size).run(discover_and_check, installed_plugin, timeout_s=300)
    assert len(passed[0]) >= 8


def test_duplicate_name_is_an_error() -> None:
    from framework import Algorithm, available_strategies, register_strategy

    assert "naive" in available_strategies()
    with pytest.raises(ValueError, match="already registered"):

        @register_strategy("naive")
        class Other(Algorithm):
            def reduce_(self, x):
                pass


@pytest.mark.full
def test_plugin_ships_its_own_config_and_runs_by_name(installed_plugin: str, tmp_path) -> None:
    """A plugin's conf/strategy/<name>.yaml joins the tree through hydra.searchpath."""
    conf = tmp_path / "plugin_conf" / "strategy"
    conf.mkdir(parents=True)
    (conf / "gather_sum.yaml").write_text(
        "name: gather_sum\nvalidate: false\ntimeout_s: ${parallel.timeout_s}\nmax_bytes: 65536\n"
    )
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": installed_plugin,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.infer",
            "strategy=gather_sum",
            f"hydra.searchpath=[file://{tmp_path / 'plugin_conf'}]",
            "workload.new_tokens=3",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["strategy"] == "gather_sum" and res["status"] == "ok"
    assert res["strategy_options"]["max_bytes"] == 65536
