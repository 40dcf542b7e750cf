"""Config composition: real Hydra over the typed schema; bad input fails at start-up with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from indexcache.config import ConfigError, load_config
from indexcache.distributed import strip_launcher_args

REPO = Path(__file__).resolve().parent.parent


def test_default_composes_to_the_embedded_run():
    cfg = load_config([])
    assert cfg.model.source == "smollm2"
    assert list(cfg.stage) == ["indexer_warmup", "distill"]
    assert cfg.stage["indexer_warmup"].pattern == "all_full"
    assert cfg.pattern.kind == "uniform" and cfg.pattern.freq == 4
    assert cfg.run_dir == "runs/smollm2_indexcache"


def test_preset_and_overrides_compose():
    cfg = load_config(["conf=tiny", "stage.warmup.steps=7", "deepspeed=zero2", "pattern.freq=3"])
    assert cfg.model.source == "tiny"
    assert list(cfg.stage) == ["warmup"] and cfg.stage["warmup"].steps == 7
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.pattern.freq == 3
    assert cfg.run_dir == "runs/tiny"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.no_such_key=1"], "no_such_key"),
        (["train.seq_len=long"], "train.seq_len"),
        (["conf=no_such_preset"], "no_such_preset"),
        (["stage.warmup.stepz=3", "conf=tiny"], "stepz"),
        (["data.sources=[/no/such/corpus]"], "/no/such/corpus"),
        (["pattern=explicit"], "pattern.value"),
        (["pattern=no_such_kind"], "pattern=no_such_kind does not exist"),
        (["stage=sparse", "stage.sparse.mode=fast"], "stage.sparse.mode"),
        (["conf=glm5_indexcache"], "model.source"),
        (["stage=sparse", "stage.sparse.activation_checkpointing=true"], "needs stage.sparse.train_base=true"),
        (["kernels.topk_filter_key_step=1"], "kernels.topk_filter_key_step=1 is invalid"),
        (["kernels.causal_kernel=flash2"], "kernels.causal_kernel"),
        (["kernels.loss_impl=fast"], "kernels.loss_impl"),
        (["kernels.topk_chunk_size=0"], "kernels.topk_chunk_size"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_kernel_settings_build_the_models_kernel_config():
    cfg = load_config(["conf=tiny", "kernels.topk_filter_key_step=16", "kernels.causal_kernel=cudnn"])
    kernels = cfg.kernels.build()
    assert kernels.topk_filter is not None and kernels.topk_filter.key_step == 16
    assert kernels.causal_kernel == "cudnn" and kernels.loss_impl == "auto"
    assert load_config(["conf=tiny"]).kernels.build().topk_filter is None


def test_launcher_local_rank_is_removed():
    assert strip_launcher_args(["--local_rank=1", "conf=tiny"]) == ["conf=tiny"]
    assert strip_launcher_args(["--local-rank", "0", "a=b"]) == ["a=b"]
    assert strip_launcher_args(["a=b"]) == ["a=b"]


@pytest.mark.parametrize("override", ["train.no_such_key=1", "conf=no_such_preset", "data.sources=[/no/such/corpus]"])
def test_cli_config_error_exits_nonzero_and_writes_nothing(tmp_path, override):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / "main.py"), "conf=tiny", f"run_dir={run_dir}", override],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    error_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("indexcache:")]
    assert len(error_lines) == 1, proc.stderr
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == [], "nothing may be written on a config error"
