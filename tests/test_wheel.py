"""The built wheel is a complete install: configs inside, console scripts, a run from outside any checkout."""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env


def test_every_package_folder_is_declared_for_the_wheel():
    """pyproject lists packages explicitly (conf/ maps to indexcache.conf): a new sub-package must be listed."""
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "indexcache").rglob("__init__.py")} | {
        "indexcache.conf"
    }
    assert declared == on_disk


def test_console_scripts_point_at_functions_that_exist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"indexcache-train", "indexcache-validate"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        source = (REPO / Path(*module.split("."))).with_suffix(".py").read_text()
        functions = {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
        assert function in functions, f"{target} does not exist"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_outside_the_checkout(tmp_path, cache_dir):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("indexcache-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The dependencies come from this environment (a .pth line adds its site-packages after the venv's own);
    # indexcache itself only from the wheel: this environment's editable finder is not processed from there.
    purelib = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = subprocess_env(cache_dir)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import indexcache.config as c; print(c.__file__, c.CONF_DIR)"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where and str(REPO) not in where, f"indexcache did not come from the wheel: {where}"
    proc = subprocess.run(
        [str(venv / "bin" / "indexcache-train"), "conf=tiny", "run_dir=run"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "indexcache: done" in proc.stdout
    assert (outside / "run" / "export" / "indexcache.json").is_file()
    check = subprocess.run(
        [str(venv / "bin" / "indexcache-validate"), str(outside / "run" / "export")],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
