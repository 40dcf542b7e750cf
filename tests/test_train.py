"""End-to-end training runs: real Hydra composition, DeepSpeed engines, checkpoints, export.

Runs go through the in-process job (`train_tiny` in conftest.py) on the tiny GLM-5-shaped preset with real stdlib
text; kills and the `deepspeed` launcher spawn real processes of `train/main.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from indexcache.validate_export import validate_export
from tests.conftest import MAIN, folder_tensors, read_metrics, subprocess_env, train_losses

INDEXER = ".self_attn.indexer."


def spawn(cache_dir: Path, cwd: Path, run_dir: Path, *overrides: str, launcher: list[str] | None = None) -> str:
    cmd = [*(launcher or [sys.executable]), str(MAIN), "conf=tiny", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd, env=subprocess_env(cache_dir))
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def source_of(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "export" / "indexcache.json").read_text())["source"]["path"])


def assert_only_f_indexers_changed(run_dir: Path, pattern: str) -> None:
    export, source = run_dir / "export", source_of(run_dir)
    validate_export(export, source_dir=source)  # also checks every non-indexer tensor is byte-identical
    exported, original = folder_tensors(export), folder_tensors(source)
    for name, value in original.items():
        if INDEXER not in name:
            assert torch.equal(exported[name], value), f"base tensor {name} changed"
    for layer, kind in enumerate(pattern):
        names = [n for n in original if n.startswith(f"model.layers.{layer}{INDEXER}")]
        assert names
        if kind == "S":
            assert not any(n in exported for n in names), f"S layer {layer} kept indexer tensors"
        else:
            changed = [n for n in names if not torch.equal(exported[n], original[n])]
            assert changed, f"F layer {layer}'s indexer did not train"


def test_single_process_run_trains_only_f_layer_indexers(tmp_path, train_tiny):
    run_dir = tmp_path / "run"
    train_tiny(run_dir)
    lines = read_metrics(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4], "one metrics line per logged step"
    assert all(line["train/kl_loss"] > 0 for line in lines)
    assert "eval/lm_loss_sparse" in lines[-1] and "eval/kl_loss" in lines[-1]
    # Each layer's recall and coverage of its own dense attention; the dashboard's "furthest from its teacher".
    for layer in range(4):
        assert 0.0 <= lines[-1][f"eval/recall/layer_{layer}"] <= 1.0
        assert 0.0 < lines[-1][f"eval/coverage/layer_{layer}"] <= 1.0
    coverages = [lines[-1][f"eval/coverage/layer_{layer}"] for layer in range(4)]
    assert lines[-1]["eval/furthest_layer"] == float(coverages.index(min(coverages)))
    assert all(lines[0][f"perf/{part}_s"] > 0 for part in ("forward", "backward", "optimizer"))
    assert (run_dir / "config.yaml").is_file()
    assert_only_f_indexers_changed(run_dir, "FFSF")
    summary = json.loads((run_dir / "export" / "indexcache.json").read_text())
    assert summary["pattern"] == "FFSF"


@pytest.mark.parametrize("stop_after", [3, 5], ids=["mid-first-stage", "mid-second-stage"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, train_tiny, stop_after):
    # Two stages (all-F warm-up, then the FFSF pattern) so a resume also crosses a stage boundary.
    stages = [
        "stage=convert_distill",
        "stage.indexer_warmup.steps=4",
        "stage.distill.steps=3",
        "train.checkpoint_every=2",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_tiny(full, *stages)
    train_tiny(resumed, *stages, f"train.stop_after_steps={stop_after}")
    assert not (resumed / "export").exists(), "a stopped run must not export"
    checkpoints = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert checkpoints[-1] != f"step_{stop_after:08d}" or stop_after == 4
    train_tiny(resumed, *stages)

    full_losses, resumed_losses = train_losses(full), train_losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 8)), "metrics.jsonl: one line per step after the resume"
    for step, loss in full_losses.items():
        assert resumed_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), f"step {step} differs"
    a, b = folder_tensors(full / "export"), folder_tensors(resumed / "export")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=f"{name} differs after resume")


def test_rerun_of_a_finished_run_is_a_no_op(tmp_path, train_tiny):
    run_dir = tmp_path / "run"
    train_tiny(run_dir)
    before = (run_dir / "export" / "indexcache.json").read_text()
    out = train_tiny(run_dir)
    assert "export already complete" in out
    assert (run_dir / "export" / "indexcache.json").read_text() == before
    assert [line["step"] for line in read_metrics(run_dir)] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_launcher_two_ranks(tmp_path, cache_dir, zero_stage, two_rank_launcher):
    run_dir = tmp_path / f"zero{zero_stage}"
    spawn(cache_dir, tmp_path, run_dir, f"deepspeed=zero{zero_stage}", launcher=two_rank_launcher)
    assert [line["step"] for line in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert_only_f_indexers_changed(run_dir, "FFSF")
    assert json.loads((run_dir / "export" / "indexcache.json").read_text())["summary"]["world_size"] == 2
    report = json.loads((run_dir / "evaluate" / "evaluation.json").read_text())
    assert report["world_size"] == 2, "the run-end evaluation runs across the training's ranks"
    assert report["model"]["pattern"] == "FFSF" and report["baseline_source"] is not None


def _checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return [int(p.name.removeprefix("step_")) for p in folder.glob("step_*")] if folder.is_dir() else []


def test_sigkill_at_an_arbitrary_moment_then_resume_matches(tmp_path, cache_dir, train_tiny):
    """A real kill -9 (possibly mid-checkpoint): the resumed run ends where the uninterrupted one does."""
    overrides = ["stage.warmup.steps=8", "train.checkpoint_every=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_tiny(full, *overrides)
    cmd = [sys.executable, str(MAIN), "conf=tiny", f"run_dir={killed}", *overrides]
    env = subprocess_env(cache_dir)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        # keep_last prunes old checkpoints, so wait for *any* checkpoint at step 3 or later.
        while max(_checkpoint_steps(killed), default=0) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "export").exists()
    train_tiny(killed, *overrides)
    assert [line["step"] for line in read_metrics(killed)] == list(range(1, 9))
    a, b = folder_tensors(full / "export"), folder_tensors(killed / "export")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=f"{name} differs after kill")


def test_explicit_pattern_run_exports_that_pattern(tmp_path, train_tiny):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, "pattern=explicit", "pattern.value=FSFS", "stage.warmup.steps=2")
    assert_only_f_indexers_changed(run_dir, "FSFS")
    config = json.loads((run_dir / "export" / "config.json").read_text())
    assert config["index_topk_pattern"] == "FSFS" and config["use_index_cache"] is True
