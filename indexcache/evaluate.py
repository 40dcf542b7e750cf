"""Evaluation of a model (a source checkpoint or an export) under a pattern, on held-out text: `evaluate.*`.

What `evaluate_model` measures, on `evaluate.batches` batches of the `data=` source's `evaluate.split`
(validation by default):
- LM loss and perplexity in dense mode, in all-F sparse mode (when every layer has an indexer) and in pattern mode;
- per layer, top-k recall and attention-mass coverage of the set it attends to in pattern mode (definitions in
  `indexcache.attention_stats`), for the model and, when there is one, its baseline (the source an export was
  trained from: before versus after training);
- the layer x layer overlap of the layers' dense-attention top-k (the paper's cross-layer redundancy).
Every metric is computed in query-row chunks: nothing of size [T, T] exists at any length. Under torch.distributed
each rank evaluates its share of the batches and every loss, recall/coverage and overlap sum is all-reduced.

The job (`indexcache-evaluate`, `python -m indexcache.evaluate`: loading, the report files, W&B) is
indexcache/apps/evaluate.py.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from indexcache.attention_stats import LayerStats, LayerStatsObserver
from indexcache.distributed import all_reduce_sum, all_reduce_sums, reduce_device, shard_for_rank
from indexcache.pattern import IndexCachePattern

if TYPE_CHECKING:
    from indexcache.model.wrapper import IndexCacheModel


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
    total = weight = 0.0
    device = next(model.parameters()).device
    shard = model.context_parallel  # a CP group scores each of its batches together
    for batch, real in shard_for_rank(batches, 1 if shard is None else shard.cp_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model(ids, mask, labels=ids, mode=mode, observer=observer if real else None)
        tokens = float(mask[:, 1:].sum()) if real else 0.0
        total += float(out.lm_loss) * tokens
        weight += tokens
    total, weight = all_reduce_sums([total, weight], reduce_device())
    return total / weight


def _reduced_stats(observer: LayerStatsObserver, num_layers: int) -> list[LayerStats]:
    """Each layer's recall/coverage sums over every rank's rows."""
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
    dense_observer = LayerStatsObserver(
        chunk_size=chunk_size,
        sample_rows_per_sequence=overlap_rows,
        topk=topk,
        sequence_length=int(batches[0]["input_ids"].shape[1]),
    )
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


def report_json(report: ModelReport) -> dict[str, Any]:
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


if __name__ == "__main__":  # `python -m indexcache.evaluate`: the job lives in indexcache.apps.evaluate
    from indexcache.apps.evaluate import main

    sys.exit(main())
