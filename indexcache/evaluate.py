"""Evaluation of a model (a source checkpoint or an export) under a pattern, on held-out text.

    python -m indexcache.evaluate [key=value ...]      (console script: indexcache-evaluate)

Reports, on `evaluate.batches` batches of the `data=` source's `evaluate.split` (validation by default):
- LM loss and perplexity in dense mode, in all-F sparse mode (when every layer has an indexer) and in pattern mode;
- per layer, top-k recall and attention-mass coverage of the set it attends to in pattern mode (definitions in
  `indexcache.attention_stats`), for the model and, when there is one, its baseline (the source an export was
  trained from: before versus after training);
- the layer x layer overlap of the layers' dense-attention top-k (the paper's cross-layer redundancy).
Every metric is computed in query-row chunks: nothing of size [T, T] exists at any length. Under a launcher
(`deepspeed --module indexcache.evaluate ...`, `deepspeed=zero3` to shard the parameters) each rank evaluates its
share of the batches and every loss, recall/coverage and overlap sum is all-reduced; rank 0 writes the report.

Writes `evaluation.json`, `overlap.png`, `recall_coverage.png` (and `search_curve.png` when `evaluate.search_curve`
names a search's `search_curve.json`) to `evaluate.out_dir` (default `<run_dir>/evaluate`), atomically, and logs
them to W&B as images and tables.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from indexcache.attention_stats import LayerStats, LayerStatsObserver
from indexcache.pattern import IndexCachePattern

if TYPE_CHECKING:
    from indexcache.config import RunConfig
    from indexcache.data import PackedSplits
    from indexcache.model.wrapper import IndexCacheModel

__all__ = [
    "EvaluateConfig",
    "ModelReport",
    "evaluate_model",
    "evaluation_batches",
    "load_data",
    "load_model",
    "main",
    "resolve_model_source",
    "run_evaluation",
    "write_report",
]

PROG = "indexcache-evaluate"
REPORT_FILE = "evaluation.json"


@dataclass
class EvaluateConfig:
    """`evaluate.*`: how much held-out text, what to compare against, and where the report goes."""

    split: str = "validation"  # split of `data=` to evaluate on
    batches: int = 4
    batch_size: int = 2
    # The "before" model of the recall/coverage bars: a checkpoint folder; "auto": the source recorded in an
    # export's indexcache.json (none for a model that is not an export); null: no baseline.
    baseline: str | None = "auto"
    overlap_rows: int = 64  # query rows per sequence sampled for the overlap matrix
    chunk_size: int = 256  # query rows per chunk of the metrics
    search_curve: str | None = None  # a search's search_curve.json, plotted with the report
    out_dir: str | None = None  # default <run_dir>/evaluate
    # Training ends by evaluating its export on the same ranks, after dropping the trained model (under ZeRO-3 the
    # export loads partitioned, as training's model did).
    after_training: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation"):
            raise ValueError(f"evaluate.split={self.split!r} is not one of ['train', 'validation']: pick one")
        for key in ("batches", "batch_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"evaluate.{key}={getattr(self, key)} is invalid: use an integer >= 1")
        if self.overlap_rows < 0:
            raise ValueError(f"evaluate.overlap_rows={self.overlap_rows} is invalid: use an integer >= 0")
        if self.baseline not in (None, "auto") and not Path(self.baseline).is_dir():
            raise ValueError(
                f"evaluate.baseline={self.baseline} is not a folder: give a checkpoint folder, auto or null"
            )
        if self.search_curve is not None and not Path(self.search_curve).is_file():
            raise ValueError(f"evaluate.search_curve={self.search_curve} does not exist: give a search_curve.json")


# ---- loading ----------------------------------------------------------------------------------------------------
# The pieces are separate so that an entry point can check a request against the source's config.json and data
# before it pays for (or prints the progress of) loading weights. Imported inside: indexcache.config imports this
# module's EvaluateConfig and must stay light.


def resolve_model_source(cfg: RunConfig, source: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The local checkpoint folder of `cfg.model` (or of `source`, e.g. a baseline) and its config.json."""
    from dataclasses import replace

    from indexcache.conversion.sources import read_config, resolve_source

    source_dir = resolve_source(cfg.model if source is None else replace(cfg.model, source=source))
    return source_dir, read_config(source_dir)


def load_data(cfg: RunConfig, source_dir: Path) -> PackedSplits:
    """The `data=` splits tokenised with the checkpoint's own tokenizer, in train.seq_len windows."""
    from indexcache.conversion.sources import load_tokenizer
    from indexcache.data import build_datasets

    return build_datasets(cfg.data, load_tokenizer(source_dir), cfg.train.seq_len)


def load_model(
    cfg: RunConfig,
    source_dir: Path,
    source_config: dict[str, Any],
    model_class: type[IndexCacheModel] | None = None,
) -> IndexCacheModel:
    """The model as training builds it (the family's loader, then `model_class`), in eval mode on `cfg.device`.

    With `deepspeed=zero3` its parameters are partitioned over the ranks as training's are (transformers builds
    them partitioned under the DeepSpeed config, then an optimizer-less ZeRO-3 engine gathers each module's
    parameters around its forward): every rank must then run the same forwards in the same order.
    """
    from indexcache.distributed import resolve_device
    from indexcache.model import IndexCacheModel, get_family
    from indexcache.run import model_dtype

    device = torch.device(resolve_device(cfg.device))
    if device.type == "cuda" and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = model_dtype(cfg.model.dtype, device)
    # The checkpoint's own layer types first: an export keeps no indexer on its S layers, so all-F cannot be applied.
    own = IndexCachePattern.from_source_config(source_config, int(source_config["num_hidden_layers"]))
    if cfg.deepspeed.zero_stage != 3:
        hf_model = get_family(source_config["model_type"]).load(source_dir, dtype)
        return (model_class or IndexCacheModel)(hf_model.to(device), pattern=own).eval()
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = cfg.deepspeed.engine_config(0.0, device)
    hf_ds_config = HfDeepSpeedConfig(config)  # transformers builds partitioned weights while this lives
    hf_model = get_family(source_config["model_type"]).load(source_dir, dtype)
    model = (model_class or IndexCacheModel)(hf_model.to(device), pattern=own).eval()
    engine, *_ = deepspeed.initialize(model=model, config=config)  # no optimizer: ZeRO-3 inference
    # Kept alive with the model (outside its module tree: the engine holds the model).
    model.__dict__["zero3_inference"] = (engine, hf_ds_config)
    return model


def evaluation_batches(windows: Any, batches: int, batch_size: int) -> list[dict[str, Tensor]]:
    """The first `batches * batch_size` windows in order (fixed, so every model sees the same text)."""
    count = min(len(windows), batches * batch_size)
    if count < 1:
        raise ValueError("the evaluation split holds no full window: add text or lower train.seq_len")
    ids = windows.with_format("torch", columns=["input_ids"])[:count]["input_ids"].long()
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)]


# ---- measuring --------------------------------------------------------------------------------------------------
@dataclass
class ModelReport:
    pattern: str
    lm_loss: dict[str, float | None]  # dense, all_full, pattern (None: not available, see `notes`)
    recall: list[float]  # per layer, pattern mode
    coverage: list[float]
    overlap: list[list[float]] | None  # dense-attention top-k overlap, [L][L]
    notes: list[str] = field(default_factory=list)

    def perplexity(self) -> dict[str, float | None]:
        return {mode: None if loss is None else math.exp(loss) for mode, loss in self.lm_loss.items()}


def _mean_loss(model: IndexCacheModel, batches: list[dict[str, Tensor]], mode: str, observer: Any = None) -> float:
    """Token-weighted LM loss over `batches`, each rank scoring its share (padding: weight 0, no observer)."""
    from indexcache.distributed import all_reduce_sums, reduce_device, shard_for_rank

    total = weight = 0.0
    device = next(model.parameters()).device
    for batch, real in shard_for_rank(batches):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model(ids, mask, labels=ids, mode=mode, observer=observer if real else None)
        tokens = float(mask[:, 1:].sum()) if real else 0.0
        total += float(out.lm_loss) * tokens
        weight += tokens
    total, weight = all_reduce_sums([total, weight], reduce_device())
    return total / weight


def _reduced_stats(observer: LayerStatsObserver, num_layers: int) -> list[LayerStats]:
    """Each layer's recall/coverage sums over every rank's rows."""
    from indexcache.distributed import all_reduce_sum, reduce_device

    sums = torch.tensor(
        [
            [s.recall_sum, s.coverage_sum, s.num_rows]
            for s in (observer.stats.get(i, LayerStats()) for i in range(num_layers))
        ],
        dtype=torch.float64,
        device=reduce_device(),
    )
    rows = all_reduce_sum(sums).tolist()
    return [LayerStats(recall, coverage, int(count)) for recall, coverage, count in rows]


def _reduced_overlap(observer: LayerStatsObserver, num_layers: int) -> list[list[float]] | None:
    """The overlap matrix over every rank's sampled rows (None when no rank sampled a row)."""
    from indexcache.distributed import all_reduce_sum, reduce_device

    hits = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    rows = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    if observer.sampled_topk:
        hits, rows = observer.overlap_sums()
    both = all_reduce_sum(torch.stack([hits, rows]).to(reduce_device())).cpu()
    if not bool(both[1].any()):
        return None
    return (both[0] / both[1]).tolist()  # 0/0: nan, as for one process


@torch.no_grad()
def evaluate_model(
    model: IndexCacheModel,
    pattern: IndexCachePattern,
    batches: list[dict[str, Tensor]],
    chunk_size: int = 256,
    overlap_rows: int = 64,
) -> ModelReport:
    """LM losses in the three modes, per-layer recall/coverage under `pattern`, and the overlap matrix.

    Leaves `pattern` applied. All-F sparse mode needs an indexer on every layer: a checkpoint that dropped the S
    layers' indexers (a glm_moe_dsa export) reports None there, with a note. Under torch.distributed each rank
    runs its share of `batches` and every number is reduced over the ranks (all ranks get the whole report).
    """
    topk = int(model.hf_model.config.index_topk)
    notes: list[str] = []
    dense_observer = LayerStatsObserver(chunk_size=chunk_size, sample_rows_per_sequence=overlap_rows, topk=topk)
    model.apply_pattern(pattern)
    losses: dict[str, float | None] = {
        "dense": _mean_loss(model, batches, "dense", dense_observer if overlap_rows else None)
    }
    try:
        model.apply_pattern(IndexCachePattern.all_full(pattern.num_layers))
        losses["all_full"] = _mean_loss(model, batches, "sparse")
    except ValueError as error:
        losses["all_full"] = None
        notes.append(f"all-F sparse mode not available: {error}")
    model.apply_pattern(pattern)
    observer = LayerStatsObserver(chunk_size=chunk_size)
    losses["pattern"] = _mean_loss(model, batches, "sparse", observer)
    stats = _reduced_stats(observer, pattern.num_layers)
    return ModelReport(
        pattern=pattern.value,
        lm_loss=losses,
        recall=[layer.recall for layer in stats],
        coverage=[layer.coverage for layer in stats],
        overlap=_reduced_overlap(dense_observer, pattern.num_layers) if overlap_rows else None,
        notes=notes,
    )


# ---- reporting --------------------------------------------------------------------------------------------------
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
    from indexcache.fsutil import atomic_write_text
    from indexcache.plots import plot_layer_bars, plot_overlap, plot_search_curve

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
        "model": _as_json(report),
        "baseline": None if baseline is None else _as_json(baseline),
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


def _as_json(report: ModelReport) -> dict[str, Any]:
    return {
        "pattern": report.pattern,
        "lm_loss": report.lm_loss,
        "perplexity": report.perplexity(),
        "recall": report.recall,
        "coverage": report.coverage,
        "overlap": report.overlap,
        "notes": report.notes,
    }


def scalar_metrics(report: ModelReport, baseline: ModelReport | None = None) -> dict[str, float]:
    """`eval/lm_loss_{mode}`, `eval/perplexity_{mode}`, `indexcache/recall|coverage/layer_{i}` (and `_before`)."""
    out: dict[str, float] = {}
    for mode, loss in report.lm_loss.items():
        if loss is not None:
            out[f"eval/lm_loss_{mode}"] = loss
            out[f"eval/perplexity_{mode}"] = math.exp(loss)
    for layer in range(len(report.pattern)):
        out[f"indexcache/recall/layer_{layer}"] = report.recall[layer]
        out[f"indexcache/coverage/layer_{layer}"] = report.coverage[layer]
        if baseline is not None:
            out[f"indexcache/recall_before/layer_{layer}"] = baseline.recall[layer]
            out[f"indexcache/coverage_before/layer_{layer}"] = baseline.coverage[layer]
    return out


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
    from indexcache.config import to_container
    from indexcache.distributed import init_distributed, main_first
    from indexcache.metrics import MetricsLogger
    from indexcache.run import build_pattern

    ev = cfg.evaluate
    dist = init_distributed(cfg.device, cfg.deepspeed.dist_backend)
    source_dir, source_config = main_first(dist, lambda: resolve_model_source(cfg))
    pattern = build_pattern(cfg.pattern, int(source_config["num_hidden_layers"]), source_config)
    data = main_first(dist, lambda: load_data(cfg, source_dir))
    windows = data.validation if ev.split == "validation" else data.train
    batches = evaluation_batches(windows, ev.batches, ev.batch_size)
    baseline_source = _baseline_source(cfg, source_dir)
    report = evaluate_model(
        load_model(cfg, source_dir, source_config), pattern, batches, ev.chunk_size, ev.overlap_rows
    )
    baseline = None
    if baseline_source is not None:  # loaded only now: two models are never held at once
        before_dir, before_config = resolve_model_source(cfg, baseline_source)
        before = load_model(cfg, before_dir, before_config)
        baseline = evaluate_model(before, pattern, batches, ev.chunk_size, overlap_rows=0)
    out_dir = Path(ev.out_dir or Path(cfg.run_dir) / "evaluate").resolve()
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
        return {**meta, "model": _as_json(report), "baseline": None if baseline is None else _as_json(baseline)}
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = Path(ev.search_curve) if ev.search_curve else None
    if logger is not None:
        return write_report(out_dir, report, baseline, meta, curve, logger=logger, step=step)
    with MetricsLogger(cfg.logger, out_dir, to_container(cfg)) as own_logger:
        return write_report(out_dir, report, baseline, meta, curve, logger=own_logger)


def evaluate_export(cfg: RunConfig, export_dir: Path) -> dict[str, Any] | None:
    """The end of a training run: its export in its trained pattern against the source it came from.

    The report goes to `<run_dir>/evaluate/` with a metrics log and W&B run of its own (the training run's
    metrics.jsonl keeps one line per training step). A re-run of a finished run finds the report and does nothing.
    """
    from dataclasses import replace

    from indexcache.config import PatternConfig

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
    from indexcache.cli import user_error
    from indexcache.config import ConfigError
    from indexcache.distributed import rank_and_world

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
    from indexcache.cli import hydra_main
    from indexcache.distributed import shutdown

    try:
        return hydra_main(evaluate_job, argv, prog=PROG)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
