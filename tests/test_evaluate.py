"""Evaluation: LM loss in three modes, per-layer recall/coverage, overlap; JSON, PNGs and an offline W&B run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from indexcache.apps.evaluate import main, run_evaluation
from indexcache.attention_stats import attention_metrics
from indexcache.config import load_config
from indexcache.conversion.sources import resolve_source
from indexcache.evaluate import evaluate_model
from indexcache.model import IndexCacheModel
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("quiet_local_wandb")


def text_batches(count: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    raw = Path(os.__file__).read_bytes()[: count * batch * seq]
    ids = (torch.tensor(list(raw), dtype=torch.long) + 3).reshape(count, batch, seq)
    return [{"input_ids": rows, "attention_mask": torch.ones_like(rows)} for rows in ids]


def test_report_losses_recall_and_overlap_match_direct_computation():
    model = IndexCacheModel(tiny_model("deepseek_v32", seed=2, vocab_size=259))
    pattern = IndexCachePattern("FSFS")
    batches = text_batches(2, 2, 32)
    report = evaluate_model(model, pattern, batches, chunk_size=8, overlap_rows=16)
    ids = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        for mode, name, applied in (
            ("dense", "dense", pattern),
            ("sparse", "all_full", None),
            ("sparse", "pattern", pattern),
        ):
            model.apply_pattern(applied or IndexCachePattern.all_full(4))
            out = model(ids, torch.ones_like(ids), labels=ids, mode=mode)
            assert report.lm_loss[name] == pytest.approx(float(out.lm_loss), rel=1e-5), name
    model.apply_pattern(pattern)
    direct = attention_metrics(model, ids, torch.ones_like(ids), chunk_size=3)
    for layer in range(4):
        assert report.recall[layer] == pytest.approx(direct[f"indexcache/recall/layer_{layer}"], rel=1e-6)
        assert report.coverage[layer] == pytest.approx(direct[f"indexcache/coverage/layer_{layer}"], rel=1e-5)
    overlap = torch.tensor(report.overlap, dtype=torch.float64)
    assert torch.allclose(overlap, overlap.T) and torch.allclose(overlap.diagonal(), torch.ones(4, dtype=torch.float64))
    assert 0.0 <= overlap.min() < 1.0  # random layers do not pick identical keys


def test_all_full_mode_is_reported_unavailable_when_s_layers_have_no_indexer():
    types = IndexCachePattern("FSFS").to_indexer_types()
    model = IndexCacheModel(tiny_model("glm_moe_dsa", vocab_size=259, indexer_types=types), IndexCachePattern("FSFS"))
    report = evaluate_model(model, IndexCachePattern("FSFS"), text_batches(1, 2, 24), overlap_rows=0)
    assert report.lm_loss["all_full"] is None and "all-F sparse mode not available" in report.notes[0]
    assert report.lm_loss["pattern"] is not None and report.overlap is None


def test_entry_point_writes_json_pngs_and_an_offline_wandb_run_with_them(tmp_path):
    source = resolve_source(load_config(["preset=tiny"]).model)
    out_dir = tmp_path / "eval"
    cfg = load_config(
        [
            "preset=tiny",
            f"run_dir={tmp_path / 'run'}",
            f"evaluate.out_dir={out_dir}",
            f"evaluate.baseline={source}",
            "evaluate.batches=2",
            "logger.wandb.mode=offline",
        ]
    )
    payload = run_evaluation(cfg)
    on_disk = json.loads((out_dir / "evaluation.json").read_text())
    assert on_disk == json.loads(json.dumps(payload))
    model = on_disk["model"]
    assert set(model["lm_loss"]) == {"dense", "all_full", "pattern"}
    for mode, loss in model["lm_loss"].items():
        assert math.isfinite(loss) and model["perplexity"][mode] == pytest.approx(math.exp(loss))
    assert len(model["recall"]) == len(model["coverage"]) == 4 and on_disk["baseline"]["recall"] == model["recall"]
    for name in ("overlap.png", "recall_coverage.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG
    runs = list((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert len(list(runs[0].rglob("*.png"))) >= 2, "the W&B run must hold both PNGs"
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"eval/lm_loss_pattern" in record and b"indexcache/coverage/layer_1" in record


def test_bad_pattern_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    resolve_source(load_config(["preset=tiny"]).model)
    capsys.readouterr()
    out_dir = tmp_path / "eval"
    assert main(["preset=tiny", "pattern=explicit", "pattern.value=FSF", f"evaluate.out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 characters" in err, err
    assert not out_dir.exists()
