"""Pattern search and evaluation across ranks: 2 CPU processes (gloo) under the `deepspeed` launcher, parameters
sharded by ZeRO-3, give what one process gives on the same data.

The calibration set (5 windows in batches of 2: 3 batches) does not split evenly over 2 ranks, so rank 1 also runs
a padding batch (weight 0) to keep ZeRO-3's collective forwards in lockstep; the search's bounded cache keeps every
2nd F layer's input (a budget of 2 boundaries of one rank's share), and the 2-rank search is stopped after one step
and resumed.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from indexcache.apps.evaluate import run_evaluation
from indexcache.apps.search import run_search
from indexcache.config import load_config
from tests.conftest import subprocess_env

# 2 boundaries of one rank's share: 2 batches x 2 sequences x 32 tokens x hidden 64 x float32, in GiB.
BUDGET_GIB = 2 * (2 * 2 * 32 * 64 * 4) / 2**30
SEARCH = ["search.calibration_tokens=160", "search.batch_size=2", f"search.cache_budget_gib={BUDGET_GIB!r}"]
EVALUATE = ["evaluate.batches=3", "evaluate.batch_size=2", "evaluate.baseline=null"]


def launch(launcher: list[str], cache_dir: Path, cwd: Path, module: str, *overrides: str) -> None:
    cmd = [*launcher, "--module", module, "preset=tiny", "deepspeed=zero3", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=subprocess_env(cache_dir))
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None and b is None) or (a is not None and b is not None and math.isnan(a) and math.isnan(b))
    return a == pytest.approx(b, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_two_rank_zero3_search_and_evaluation_equal_one_process(tmp_path, cache_dir, two_rank_launcher):
    one = run_search(load_config(["preset=tiny", f"run_dir={tmp_path / 'one'}", *SEARCH]))
    # Stopped after one step, then continued by the same command: rank 0 reads the state file for both ranks.
    launch(
        two_rank_launcher,
        cache_dir,
        tmp_path,
        "indexcache.search",
        f"run_dir={tmp_path / 'two'}",
        *SEARCH,
        "search.stop_after_steps=1",
    )
    out = tmp_path / "two" / "search"
    assert len(json.loads((out / "search_state.json").read_text())["curve"]) == 2
    assert not (out / "pattern.txt").exists()
    launch(two_rank_launcher, cache_dir, tmp_path, "indexcache.search", f"run_dir={tmp_path / 'two'}", *SEARCH)
    two = json.loads((out / "search_curve.json").read_text())
    assert two["world_size"] == 2 and two["cost"]["cache_stride"] == 2
    assert two["pattern"] == one.pattern == (out / "pattern.txt").read_text().strip()
    assert [e["switched"] for e in two["curve"]] == [e["switched"] for e in one.curve]
    for ours, theirs in zip(two["curve"], one.curve, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["candidates"] == pytest.approx(theirs["candidates"], rel=1e-5)
    # Counted on both ranks in the resumed process, the padding batch included: 4 layers x 2 batches x 2 ranks x
    # 4 scored patterns (the resumed start and the 2 + 1 candidates of the last two steps); the totals add the
    # first invocation's.
    cost = two["cost"]
    assert cost["invocations"] == len(cost["per_invocation"]) == 2
    assert cost["per_invocation"][-1]["naive_layer_forwards"] == 4 * 2 * 2 * 4
    assert cost["naive_layer_forwards"] == sum(part["naive_layer_forwards"] for part in cost["per_invocation"])
    state = json.loads((out / "search_state.json").read_text())
    assert state["curve"] == two["curve"]

    ev_one = run_evaluation(load_config(["preset=tiny", f"evaluate.out_dir={tmp_path / 'ev1'}", *EVALUATE]))
    ev_out = f"evaluate.out_dir={tmp_path / 'ev2'}"
    launch(two_rank_launcher, cache_dir, tmp_path, "indexcache.evaluate", ev_out, *EVALUATE)
    ev_two = json.loads((tmp_path / "ev2" / "evaluation.json").read_text())
    assert ev_two["world_size"] == 2 and ev_two["sequences"] == ev_one["sequences"] == 6
    ours, theirs = ev_two["model"], ev_one["model"]
    for mode in ("dense", "all_full", "pattern"):
        assert close(ours["lm_loss"][mode], theirs["lm_loss"][mode]), mode
    for key in ("recall", "coverage"):
        assert all(close(a, b) for a, b in zip(ours[key], theirs[key], strict=True)), key
    pairs = zip(ours["overlap"], theirs["overlap"], strict=True)
    assert all(close(a, b) for row, ref in pairs for a, b in zip(row, ref, strict=True)), "overlap"
