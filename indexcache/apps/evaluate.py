"""`indexcache-evaluate`: a model (a source checkpoint or an export) evaluated under a pattern, and its report.

    indexcache-evaluate [key=value ...]  |  python -m indexcache.evaluate ...
    deepspeed --module indexcache.evaluate ...   (each rank its share of the batches; `deepspeed=zero3` shards the
                                                  parameters as training does)

What is measured: indexcache/evaluate.py. This job loads the model (and its baseline) through indexcache.loading,
evaluates both on the same held-out batches and, on rank 0, writes `evaluation.json`, `overlap.png`,
`recall_coverage.png` (and `search_curve.png` when `evaluate.search_curve` names a search's `search_curve.json`) to
`evaluate.out_dir` (default `<run_dir>/evaluate`), atomically, and logs them to W&B as images and tables. A training
run ends with `evaluate_export`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from indexcache.cli import hydra_main, user_error
from indexcache.config import ConfigError, PatternConfig, RunConfig, to_container
from indexcache.context_parallel import new_context_shard
from indexcache.distributed import DistInfo, finish, init_distributed, main_first, rank_and_world, shutdown
from indexcache.evaluate import ModelReport, evaluate_model, evaluation_batches, report_json, scalar_metrics
from indexcache.fsutil import atomic_write_text
from indexcache.loading import load_data, load_model, resolve_model_source
from indexcache.metrics import MetricsLogger
from indexcache.pattern import IndexCachePattern
from indexcache.plots import plot_layer_bars, plot_overlap, plot_search_curve
from indexcache.run import build_pattern

PROG = "indexcache-evaluate"
REPORT_FILE = "evaluation.json"


def write_report(
    out_dir: Path,
    report: ModelReport,
    baseline: ModelReport | None,
    meta: dict[str, Any],
    search_curve: Path | None = None,
    logger: Any = None,
    step: int = 0,
) -> dict[str, Any]:
    """Write evaluation.json and the PNGs (atomically) and log them to `logger`'s W&B run; returns the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    if report.overlap is not None:
        images["eval/overlap"] = plot_overlap(torch.tensor(report.overlap), report.pattern, out_dir / "overlap.png")
    series = {}
    if baseline is not None:
        series["before (baseline)"] = {"recall": baseline.recall, "coverage": baseline.coverage}
    series["after (this model)" if baseline is not None else "this model"] = {
        "recall": report.recall,
        "coverage": report.coverage,
    }
    images["eval/recall_coverage"] = plot_layer_bars(report.pattern, series, out_dir / "recall_coverage.png")
    if search_curve is not None:
        curve = json.loads(search_curve.read_text())["curve"]
        images["eval/search_curve"] = plot_search_curve(curve, out_dir / "search_curve.png")
    payload = {
        **meta,
        "model": report_json(report),
        "baseline": None if baseline is None else report_json(baseline),
        "images": {name: str(path) for name, path in images.items()},
    }
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(payload, indent=1))
    if logger is not None:
        logger.log(step, scalar_metrics(report, baseline))
        rows = [
            [layer, kind, report.recall[layer], report.coverage[layer]]
            + ([baseline.recall[layer], baseline.coverage[layer]] if baseline is not None else [])
            for layer, kind in enumerate(report.pattern)
        ]
        columns = ["layer", "type", "recall", "coverage"] + (
            ["recall_before", "coverage_before"] if baseline is not None else []
        )
        logger.log_media(step, images, {"eval/layers": (columns, rows)})
    return payload


def _baseline_source(cfg: RunConfig, source_dir: Path) -> str | None:
    if cfg.evaluate.baseline != "auto":
        return cfg.evaluate.baseline
    meta = source_dir / "indexcache.json"
    if not meta.is_file():
        return None
    recorded = json.loads(meta.read_text()).get("source", {})
    path = recorded.get("path") if isinstance(recorded, dict) else None
    return path if path and Path(path).is_dir() else None


def run_evaluation(cfg: RunConfig, logger: Any = None, step: int = 0) -> dict[str, Any]:
    """Load the model (and its baseline), evaluate both on the same held-out batches, write the report.

    `logger` (a training run's MetricsLogger) receives the report at `step`; without one the report gets a logger
    of its own in the report's folder.
    """
    ev = cfg.evaluate
    dist = init_distributed(cfg.device, cfg.deepspeed.dist_backend)
    source_dir, source_config = main_first(dist, lambda: resolve_model_source(cfg.model))
    pattern = build_pattern(cfg.pattern, int(source_config["num_hidden_layers"]), source_config)
    batches = held_out_batches(cfg, dist, source_dir)
    baseline_source = _baseline_source(cfg, source_dir)
    report = measure(cfg, dist, source_dir, source_config, pattern, batches, ev.overlap_rows)
    baseline = None
    if baseline_source is not None:  # loaded only now: two models are never held at once
        before_dir, before_config = resolve_model_source(cfg.model, baseline_source)
        baseline = measure(cfg, dist, before_dir, before_config, pattern, batches, overlap_rows=0)
    meta = {
        "source": str(source_dir),
        "baseline_source": baseline_source,
        "split": ev.split,
        "sequences": sum(len(b["input_ids"]) for b in batches),
        "seq_len": cfg.train.seq_len,
        "index_topk": int(source_config.get("index_topk", 0)),
        "world_size": dist.world_size,
    }
    if not dist.is_main:  # every rank holds the whole (reduced) report; rank 0 alone writes it
        return {**meta, "model": report_json(report), "baseline": None if baseline is None else report_json(baseline)}
    out_dir = Path(ev.out_dir or Path(cfg.run_dir) / "evaluate").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = Path(ev.search_curve) if ev.search_curve else None
    if logger is not None:
        return write_report(out_dir, report, baseline, meta, curve, logger=logger, step=step)
    with MetricsLogger(cfg.logger, out_dir, to_container(cfg)) as own_logger:
        return write_report(out_dir, report, baseline, meta, curve, logger=own_logger)


def held_out_batches(cfg: RunConfig, dist: DistInfo, source_dir: Path) -> list[dict[str, Tensor]]:
    """`evaluate.batches` batches of `evaluate.split`, tokenised with the checkpoint's tokenizer (rank 0 first)."""
    data = main_first(dist, lambda: load_data(cfg.data, source_dir, cfg.train.seq_len))
    windows = data.validation if cfg.evaluate.split == "validation" else data.train
    return evaluation_batches(windows, cfg.evaluate.batches, cfg.evaluate.batch_size)


def measure(
    cfg: RunConfig,
    dist: DistInfo,
    source_dir: Path,
    source_config: dict[str, Any],
    pattern: IndexCachePattern,
    batches: list[dict[str, Tensor]],
    overlap_rows: int,
) -> ModelReport:
    """One model loaded, evaluated under `pattern`, and let go on return (each sequence split over a CP group when
    `deepspeed.context_parallel_size` > 1, as in training)."""
    shard = new_context_shard(cfg.deepspeed.context_parallel_size, cfg.train.seq_len)
    loaded = load_model(
        cfg.model,
        cfg.deepspeed,
        source_dir,
        source_config,
        None,
        dist.device,
        inference=True,
        context_parallel=shard,
        kernels=cfg.kernels.build(),
    )
    return evaluate_model(loaded.model, pattern, batches, cfg.evaluate.chunk_size, overlap_rows)


def evaluate_export(cfg: RunConfig, export_dir: Path) -> dict[str, Any] | None:
    """The end of a training run: its export in its trained pattern against the source it came from.

    The report goes to `<run_dir>/evaluate/` with a metrics log and W&B run of its own (the training run's
    metrics.jsonl keeps one line per training step). A re-run of a finished run finds the report and does nothing.
    """
    exported = replace(
        cfg,
        model=replace(cfg.model, source=str(export_dir)),
        pattern=PatternConfig(kind="source"),
        evaluate=replace(cfg.evaluate, baseline="auto", out_dir=str(Path(cfg.run_dir) / "evaluate")),
    )
    if (Path(cfg.run_dir) / "evaluate" / REPORT_FILE).is_file():
        return None
    return run_evaluation(exported)


def evaluate_job(cfg: RunConfig) -> int:
    """One evaluation job. 0 after writing the report; 2 after a user error."""
    try:
        payload = run_evaluation(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        return user_error(PROG, error) if rank_and_world()[0] == 0 else 2
    if rank_and_world()[0] != 0:
        return 0
    losses = payload["model"]["lm_loss"]
    parts = [f"{mode} {value:.4f}" for mode, value in losses.items() if value is not None]
    print(f"{PROG}: pattern {payload['model']['pattern']}: LM loss {', '.join(parts)}; report in {payload['images']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Hydra's command line, the same config surface as training (`--help`, `--cfg`, `-m`, one-line errors)."""
    try:
        code = hydra_main(evaluate_job, argv, prog=PROG)
    except BaseException:
        shutdown()
        raise
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
