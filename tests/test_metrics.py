"""MetricsLogger with real W&B (offline: no network), a real metrics.jsonl and a real tqdm bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from indexcache.metrics import LoggerConfig, MetricsLogger, WandbConfig

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("quiet_local_wandb")


def logger_config(mode: str, progress_bar: bool = False) -> LoggerConfig:
    return LoggerConfig(wandb=WandbConfig(mode=mode, tags=["test"]), progress_bar=progress_bar)


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_offline_wandb_writes_the_run_under_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    resolved = {"model": {"source": "tiny"}, "marker": "resolved-config-marker"}
    logger = MetricsLogger(logger_config("offline"), run_dir, resolved, rank=0)
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": 10.0 / step, "perf/tokens_per_s": 1234.5})
    logger.close()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    # The .wandb file is W&B's own protobuf log: the metric names, a value and the resolved config are in it.
    content = records[0].read_bytes()
    for needle in (b"train/loss", b"perf/tokens_per_s", b"resolved-config-marker", b"3.33333"):
        assert needle in content
    assert [line["step"] for line in read_lines(run_dir)] == [1, 2, 3]


CHILDREN_AND_IMPORTS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    def children():
        # Linux /proc scan: every process whose parent is this one.
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(entry.name))
        return found

    from indexcache.metrics import LoggerConfig, MetricsLogger, WandbConfig
    cfg = LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=True)
    logger = MetricsLogger(cfg, sys.argv[1], {"a": 1}, rank=0)
    for step in range(1, 101):
        logger.log(step, {"train/loss": 1.0})
        logger.progress(step, 100, 1.0, 1000.0)
    logger.close()
    print(json.dumps({"wandb_imported": "wandb" in sys.modules, "children": children()}))
    """
)


def test_disabled_wandb_imports_nothing_and_spawns_nothing(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", CHILDREN_AND_IMPORTS, str(run_dir)], capture_output=True, text=True, env=env, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["wandb_imported"] is False
    assert report["children"] == []
    assert not (run_dir / "wandb").exists()
    assert len(read_lines(run_dir)) == 100


def test_metrics_jsonl_has_one_line_per_step_after_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = MetricsLogger(logger_config("disabled"), run_dir, {}, rank=0)
    for step in range(1, 7):
        first.log(step, {"train/loss": torch.tensor(float(step)), "indexcache/kl/layer_0": 0.5})
    first.close()
    with (run_dir / "metrics.jsonl").open("a") as torn:
        torn.write('{"step": 7, "train/lo')  # the kill that forces the resume tore the last line

    # Resumed from the checkpoint at step 4: steps 5-6 are redone, so their old lines must go.
    resumed = MetricsLogger(logger_config("disabled"), run_dir, {}, rank=0, resume_step=4)
    for step in range(5, 9):
        resumed.log(step, {"train/loss": float(step)})
    resumed.close()

    lines = read_lines(run_dir)
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert lines[0]["train/loss"] == 1.0 and lines[0]["indexcache/kl/layer_0"] == 0.5  # tensors became numbers
    assert all(isinstance(line["time"], float) for line in lines)

    MetricsLogger(logger_config("disabled"), run_dir, {}, rank=0).close()  # a fresh run starts a fresh file
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_offline_resume_keeps_the_wandb_run_id(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(logger_config("offline"), run_dir, {}, rank=0) as first:
        first.log(1, {"train/loss": 1.0})
    with MetricsLogger(logger_config("offline"), run_dir, {}, rank=0, resume_step=1) as resumed:
        resumed.log(2, {"train/loss": 0.5})
    records = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2 and len({path.name for path in records}) == 1, "a resume continues the W&B run id"


def test_nonzero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(logger_config("offline", progress_bar=True), run_dir, {"a": 1}, rank=1)
    logger.log(1, {"train/loss": 1.0})
    logger.progress(1, 10, 1.0, 100.0)
    logger.close()
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="prefix"):  # names are checked on every rank
        logger.log(2, {"loss": 1.0})


def test_metric_names_need_a_known_prefix(tmp_path):
    logger = MetricsLogger(logger_config("disabled"), tmp_path / "run", {}, rank=0)
    with pytest.raises(ValueError, match=r"train/\|eval/\|perf/\|indexcache/"):
        logger.log(1, {"loss": 1.0})
    logger.log(1, {"train/loss": 1.0, "eval/kl_loss": 2.0, "perf/step_time_s": 0.1, "indexcache/kl/layer_0": 0.3})
    logger.close()
    assert len(read_lines(tmp_path / "run")) == 1


def test_unknown_wandb_mode_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError) as error:
        MetricsLogger(logger_config("onlin"), tmp_path / "run", {}, rank=0)
    message = str(error.value)
    assert "\n" not in message and "logger.wandb.mode=onlin" in message
    assert all(mode in message for mode in ("online", "offline", "disabled"))
    assert not (tmp_path / "run").exists()


def test_progress_bar_shows_loss_throughput_and_eta(tmp_path, capsys):
    logger = MetricsLogger(logger_config("disabled", progress_bar=True), tmp_path / "run", {}, rank=0)
    for step in range(1, 4):
        logger.progress(step, 10, 2.5, 12345.0)
    logger.close()
    err = capsys.readouterr().err
    assert "3/10" in err and "loss=2.5000" in err and "tok_s=12,345" in err and "<" in err  # "<" precedes tqdm's ETA
