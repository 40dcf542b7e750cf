"""The command line users type: Hydra's own flags, sweeps, and bad configs that write nothing.

These spawn `train/main.py` (the CLI surface is what they test); everything else runs in-process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from indexcache.cli import job_overrides
from indexcache.config import CONF_DIR, ConfigError, compose_config, presets, to_container
from tests.conftest import MAIN, subprocess_env


def cli(cache_dir: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=subprocess_env(cache_dir),
    )


def test_help_lists_groups_options_and_presets(tmp_path, cache_dir):
    proc = cli(cache_dir, tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Config groups" in proc.stdout
    for group in ("model", "data", "pattern", "stage", "deepspeed", "logger", "preset"):
        assert f"\n{group}: " in proc.stdout, f"group {group} missing from --help"
    assert "glm5_indexcache" in proc.stdout and "tiny" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "--help writes nothing"


@pytest.mark.parametrize("which", ["job", "all"])
def test_cfg_prints_the_composed_config_and_writes_nothing(tmp_path, cache_dir, which):
    run_dir = tmp_path / "run"
    proc = cli(cache_dir, tmp_path, "conf=tiny", f"run_dir={run_dir}", "pattern.freq=3", "--cfg", which)
    assert proc.returncode == 0, proc.stderr
    assert "freq: 3" in proc.stdout and "source: tiny" in proc.stdout
    assert ("hydra:" in proc.stdout) == (which == "all")
    assert list(tmp_path.iterdir()) == []


def test_info_runs(tmp_path, cache_dir):
    proc = cli(cache_dir, tmp_path, "--info", "searchpath")
    assert proc.returncode == 0, proc.stderr
    assert str(CONF_DIR) in proc.stdout


def test_multirun_sweep_runs_each_job_in_its_own_directory(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = cli(cache_dir, tmp_path, "-m", "conf=tiny", f"hydra.sweep.dir={sweep}", "pattern.freq=2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("indexcache: done")]
    assert len(summaries) == 2, proc.stdout
    assert "pattern FFSF" in summaries[0] and "pattern FFSS" in summaries[1]
    for job in ("0", "1"):
        assert (sweep / job / "export" / "indexcache.json").is_file()
        assert (sweep / job / "config.yaml").is_file()


def test_sweep_jobs_are_all_checked_before_any_runs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = cli(cache_dir, tmp_path, "-m", "conf=tiny", f"hydra.sweep.dir={sweep}", "train.keep_last=1,0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "indexcache: config error: train.keep_last=0 is invalid: use an integer >= 1"
    ]
    assert not sweep.exists(), "the good job must not run when another job of the sweep is bad"


def test_sweep_overrides_expand_to_every_combination():
    jobs = job_overrides(["-m", "conf=tiny", "pattern.freq=2,4", "train.seed=0,1"])
    assert sorted(map(tuple, jobs)) == sorted(
        ("conf=tiny", f"pattern.freq={f}", f"train.seed={s}") for f in (2, 4) for s in (0, 1)
    )
    assert job_overrides(["conf=tiny", "a.b=1"]) == [["conf=tiny", "a.b=1"]]


@pytest.mark.parametrize("preset", presets())
def test_every_preset_composes(preset, tmp_path):
    """Every preset composes and passes its checks, given the paths only a user can give."""
    overrides = [f"preset={preset}"]
    if preset != "tiny":
        # Real presets need a checkpoint and data of the user's: give existing folders.
        overrides += [f"model.source={tmp_path}", f"data.sources=[{tmp_path}]"]
    try:
        cfg = compose_config(overrides)
    except ConfigError as error:  # a real preset may require more keys: the message must say which
        pytest.fail(f"preset {preset} does not compose: {error}")
    assert cfg.stage, f"preset {preset} has no stage"
    # A group chosen on the command line beats the preset's choice (W&B off for a smoke run of a real preset).
    assert compose_config([*overrides, "logger=disabled"]).logger.wandb.mode == "disabled"


@pytest.mark.parametrize(
    "override",
    sorted(f"{path.parent.name}={path.stem}" for path in CONF_DIR.glob("*/*.yaml") if path.parent.name != "preset"),
)
def test_every_config_option_composes(override, tmp_path):
    """Each option of each group composes with the default config (options needing a value get one)."""
    extra = {
        "pattern=explicit": ["pattern.value=FSSSSSSSSSSSSSSSSSSSSSSSSSSSSS"],
        "pattern=file": [f"pattern.path={tmp_path / 'p.txt'}"],
        "data=files": [f"data.sources=[{tmp_path}]"],
        "data=saved": [f"data.saved_dataset={tmp_path}"],
    }
    (tmp_path / "p.txt").write_text("F" * 30)
    cfg = to_container(compose_config([override, *extra.get(override, [])]))
    group, option = override.split("=")
    chosen = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    if group == "stage":
        assert list(cfg["stage"]) == list(chosen), "the stage option sets exactly its stages"
    given = {item.split("=")[0].split(".")[-1] for item in extra.get(override, [])}
    for key, value in chosen.items():
        if group != "stage" and not isinstance(value, dict) and key not in given:
            assert cfg[group][key] == value, f"{override}: {group}.{key} is not the option's value"
