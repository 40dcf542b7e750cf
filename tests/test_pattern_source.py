"""The run's pattern is the one pattern a run reports and exports, whatever pattern its last stage trained in."""

from __future__ import annotations

import json
import re

from indexcache.checkpoint import CheckpointManager
from tests.conftest import folder_tensors


def test_a_final_all_f_stage_exports_and_reports_the_runs_pattern(tmp_path, train_tiny):
    run_dir = tmp_path / "run"
    # conf=tiny's pattern is FFSF; its one (so final) stage trains every layer's indexer, all-F.
    out = train_tiny(run_dir, "stage.warmup.pattern=all_full", "stage.warmup.steps=2", "train.checkpoint_every=2")

    summary = re.search(r"indexcache: done .*: pattern (\w+) ", out)
    assert summary is not None, out[-2000:]
    checkpoint = CheckpointManager.read_state(CheckpointManager.newest(run_dir / "checkpoints"))
    record = json.loads((run_dir / "export" / "indexcache.json").read_text())
    serving = json.loads((run_dir / "export" / "config.json").read_text())
    report = json.loads((run_dir / "evaluate" / "evaluation.json").read_text())
    reported = {
        "summary line": summary.group(1),
        "checkpoint": checkpoint.pattern,
        "indexcache.json": record["pattern"],
        "served config.json": serving["index_topk_pattern"],
        "run-end evaluation": report["model"]["pattern"],
    }
    assert set(reported.values()) == {"FFSF"}, reported
    exported = folder_tensors(run_dir / "export")
    assert not any(name.startswith("model.layers.2.self_attn.indexer.") for name in exported), "S layer 2's indexer"
    assert any(name.startswith("model.layers.3.self_attn.indexer.") for name in exported)
