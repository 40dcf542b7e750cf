"""Per-layer attention statistics: top-k recall, attention-mass coverage and the cross-layer top-k overlap.

For a layer l with dense attention p_l[t, :] = (1/H) sum_h softmax_s(Q_l[h,t] . K_l[h,s] * scale) (causal, padding
keys excluded; docs/DESIGN.md section 1) and the set A_l[t] of K keys the layer attends to in sparse mode (its F layer's
top-k):

    recall_l   = mean_t |A_l[t] ∩ topK(p_l[t, :])| / K
    coverage_l = mean_t sum_{s in A_l[t]} p_l[t, s]

Both are averaged over *sparse rows*: valid (non-padding) query rows that see more than K keys. A row that sees at
most K keys attends to all of them, so its recall and coverage are 1 whatever the indexer does; counting those rows
would only pull every layer towards 1. Overlap between layers a and b is mean_t |D_a[t] ∩ D_b[t]| / K over sampled
sparse rows, with D_l[t] = topK(p_l[t, :]), the layer's own dense-attention top-k: what an ideal indexer would pick,
defined for every layer even where a checkpoint keeps no indexer (the cross-layer redundancy IndexCache exploits).

`LayerStatsObserver` computes these as the model runs (it is handed every layer's teacher query/key by
`IndexCacheModel.forward(observer=...)`), in query-row chunks: nothing of size [T, T] exists, only [B, H, chunk, T].
`reference_layer_stats` is the materialising float64 reference the tests compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from indexcache.model.context import teacher_rows

if TYPE_CHECKING:
    from indexcache.context_parallel import Segment
    from indexcache.losses import TeacherInputs
    from indexcache.model.indexer import IndexerSelection

__all__ = [
    "LayerStats",
    "LayerStatsObserver",
    "attention_metrics",
    "chunked_layer_stats",
    "layer_metrics",
    "overlap_matrix",
    "overlap_sums",
    "reference_layer_stats",
    "sample_rows",
]


@dataclass
class LayerStats:
    """Sums over the sparse rows seen so far; `recall`/`coverage` are their means (1.0 when no row was sparse)."""

    recall_sum: float = 0.0
    coverage_sum: float = 0.0
    num_rows: int = 0

    def add(self, other: LayerStats) -> None:
        self.recall_sum += other.recall_sum
        self.coverage_sum += other.coverage_sum
        self.num_rows += other.num_rows

    @property
    def recall(self) -> float:
        return self.recall_sum / self.num_rows if self.num_rows else 1.0

    @property
    def coverage(self) -> float:
        return self.coverage_sum / self.num_rows if self.num_rows else 1.0


def _visible(start: int, stop: int, num_keys: int, real_BS: Tensor) -> Tensor:
    """[B, stop - start, num_keys] bool: key s visible from query t iff s <= t and s is a real token."""
    query_pos = torch.arange(start, stop, device=real_BS.device)[:, None]
    key_pos = torch.arange(num_keys, device=real_BS.device)[None, :]
    return (key_pos <= query_pos)[None] & real_BS[:, None, :num_keys]


def _dense_probs(query: Tensor, key: Tensor, scaling: float, visible: Tensor, start: int, stop: int) -> Tensor:
    """Head-averaged causal attention [B, stop - start, S] of local query rows [start, stop) over the S keys of
    `visible` [B, stop - start, S] (keys it hides are 0).

    float32 accumulation (float64 inputs stay float64). Rows with no visible key (padding queries) come out as 0.
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query[:, :, start:stop].to(dtype)
    k = key[:, :, : visible.shape[-1]].to(dtype)
    if k.shape[1] != q.shape[1]:  # GQA: each key head serves a contiguous group of query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, c, stop]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    has_key = visible.any(dim=-1)[:, None, :, None]
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~has_key, 0.0)
    return probs.mean(dim=1)


def chunked_layer_stats(
    teacher: TeacherInputs,
    topk_indices: Tensor,
    attention_mask: Tensor | None,
    chunk_size: int = 256,
    sample_positions: Tensor | None = None,
    query_offset: int = 0,
) -> tuple[LayerStats, Tensor | None]:
    """Recall and coverage of one layer attending to `topk_indices` [B, T, K] (-1 = no key), chunked over rows.

    Returns the layer's stats and, when `sample_positions` (query positions, sorted) is given, the layer's own
    dense-attention top-k at those rows [B, len(positions), K] (-1 where the row is not sparse), for the overlap.
    Peak extra memory: a few [B, H, chunk_size, T] buffers.

    `query_offset` > 0 (context parallelism): the teacher's query rows and `topk_indices` are the rows at global
    positions query_offset + t, its key and `attention_mask` cover the query_offset + T keys they may see;
    `sample_positions` then index those local rows.
    """
    query, key = teacher.query, teacher.key
    batch, _, seq, _ = query.shape
    num_keep = topk_indices.shape[-1]
    real_BS = torch.ones(batch, key.shape[2], dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        real_BS = attention_mask.bool()
    stats = LayerStats()
    sampled = None
    if sample_positions is not None:
        sampled = torch.full((batch, len(sample_positions), num_keep), -1, dtype=torch.long, device=query.device)
    recall_sum = coverage_sum = query.new_zeros((), dtype=torch.float64)
    num_rows = 0
    for start in range(0, seq, chunk_size):
        stop = min(start + chunk_size, seq)
        key_stop = query_offset + stop
        visible = _visible(query_offset + start, key_stop, key_stop, real_BS)
        probs = _dense_probs(query, key, scaling=teacher.scaling, visible=visible, start=start, stop=stop)
        sparse_rows = real_BS[:, query_offset + start : key_stop] & (visible.sum(dim=-1) > num_keep)  # [B, c]
        if not bool(sparse_rows.any()):
            continue
        # -1 slots (and, defensively, keys not visible) point at an extra zero column and so count for nothing.
        attended = topk_indices[:, start:stop].long()
        attended = torch.where(attended >= 0, attended, key_stop)
        padded_probs = torch.cat([probs, probs.new_zeros(*probs.shape[:2], 1)], dim=-1)
        coverage = padded_probs.gather(-1, attended.clamp(max=key_stop)).sum(dim=-1)
        dense_topk = probs.topk(num_keep, dim=-1).indices  # [B, c, K]; sparse rows see > K keys, all K visible
        in_dense = torch.zeros_like(padded_probs, dtype=torch.bool).scatter_(-1, dense_topk, True)
        in_dense[..., key_stop] = False
        recall = in_dense.gather(-1, attended.clamp(max=key_stop)).sum(dim=-1).double() / num_keep
        recall_sum = recall_sum + recall[sparse_rows].double().sum()
        coverage_sum = coverage_sum + coverage[sparse_rows].double().sum()
        num_rows += int(sparse_rows.sum())
        if sampled is not None:
            picked = (sample_positions >= start) & (sample_positions < stop)
            rows = sample_positions[picked] - start
            topk_rows = dense_topk[:, rows].masked_fill(~sparse_rows[:, rows, None], -1)
            sampled[:, picked] = topk_rows
    stats.recall_sum, stats.coverage_sum, stats.num_rows = float(recall_sum), float(coverage_sum), num_rows
    return stats, sampled


def reference_layer_stats(
    teacher: TeacherInputs, topk_indices: Tensor, attention_mask: Tensor | None
) -> tuple[LayerStats, Tensor]:
    """Materialising float64 reference of `chunked_layer_stats` (tests only): full [B, H, T, T] attention.

    Returns the stats and the dense top-k of every row [B, T, K] (-1 for rows that are not sparse).
    """
    query, key = teacher.query.double(), teacher.key.double()
    batch, heads, seq, _ = query.shape
    num_keep = topk_indices.shape[-1]
    real = torch.ones(batch, seq, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", query, key).cpu() * teacher.scaling
    stats = LayerStats()
    dense_topk = torch.full((batch, seq, num_keep), -1, dtype=torch.long)
    topk = topk_indices.cpu()
    for b in range(batch):
        for t in range(seq):
            visible = [s for s in range(t + 1) if real[b, s]]
            if not real[b, t] or len(visible) <= num_keep:
                continue
            row = torch.softmax(scores[b, :, t, visible], dim=-1).mean(dim=0)  # [len(visible)]
            probs = dict(zip(visible, row.tolist(), strict=True))
            ideal = {visible[i] for i in row.topk(num_keep).indices.tolist()}
            dense_topk[b, t] = torch.tensor(sorted(ideal, key=lambda s: -probs[s]))
            chosen = {int(s) for s in topk[b, t] if s >= 0 and int(s) in probs}
            stats.recall_sum += len(chosen & ideal) / num_keep
            stats.coverage_sum += sum(probs[s] for s in chosen)
            stats.num_rows += 1
    return stats, dense_topk


def sample_rows(seq_len: int, topk: int, count: int) -> Tensor:
    """Up to `count` evenly spaced query positions among those that can see more than `topk` keys."""
    if seq_len <= topk or count < 1:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(topk, seq_len - 1, min(count, seq_len - topk)).round().long().unique()


def overlap_matrix(topk_by_layer: list[Tensor]) -> Tensor:
    """[L, L] mean |D_a ∩ D_b| / K over rows both layers have (-1 rows are skipped); topk_by_layer[l]: [N, K].

    One layer's membership table [N, max key + 1] at a time, so memory stays O(N * T).
    """
    hits, rows = overlap_sums(topk_by_layer)
    return hits / rows  # nan where no row is shared


def overlap_sums(topk_by_layer: list[Tensor]) -> tuple[Tensor, Tensor]:
    """[L, L] sums of |D_a ∩ D_b| / K and counts of the rows both layers have: `overlap_matrix`'s numerator and
    denominator, which add up over ranks."""
    num_layers = len(topk_by_layer)
    hits_sum = torch.zeros((num_layers, num_layers), dtype=torch.float64)
    rows = torch.zeros((num_layers, num_layers), dtype=torch.float64)
    if num_layers == 0:
        return hits_sum, rows
    num_keys = max(int(t.max()) for t in topk_by_layer) + 2
    for a, rows_a in enumerate(topk_by_layer):
        valid_a = rows_a[:, 0] >= 0
        member = torch.zeros(rows_a.shape[0], num_keys, dtype=torch.bool)
        member.scatter_(-1, torch.where(rows_a >= 0, rows_a, num_keys - 1), True)
        member[:, -1] = False
        for b, rows_b in enumerate(topk_by_layer):
            valid = valid_a & (rows_b[:, 0] >= 0)
            hits = member.gather(-1, torch.where(rows_b >= 0, rows_b, num_keys - 1)).sum(dim=-1)
            hits_sum[a, b] = (hits[valid].double() / rows_a.shape[-1]).sum()
            rows[a, b] = int(valid.sum())
    return hits_sum, rows


@dataclass
class LayerStatsObserver:
    """Collects per-layer recall/coverage (and sampled dense top-k for the overlap) during sparse forwards.

    Pass it as `IndexCacheModel.forward(..., observer=obs)`; a dense-mode forward has no top-k to score, so only
    the overlap rows are taken there (`sample_rows_per_sequence` > 0).
    """

    chunk_size: int = 256
    sample_rows_per_sequence: int = 0
    topk: int | None = None  # K for dense forwards (they compute no top-k); sparse forwards use the selection's
    # The whole sequence's length, where the sampled rows are chosen (context parallelism hands the observer one run
    # of rows at a time); None: the rows it is handed are the whole sequence.
    sequence_length: int | None = None
    stats: dict[int, LayerStats] = field(default_factory=dict)
    sampled_topk: dict[int, list[Tensor]] = field(default_factory=dict)

    def __call__(
        self,
        layer_idx: int,
        selection: IndexerSelection,
        teacher: TeacherInputs,
        attention_mask: Tensor | None,
        segments: tuple[Segment, ...] | None = None,
    ) -> None:
        """One layer's statistics; `segments` (context parallelism): the runs of global positions the local rows
        are, each scored against the keys it may see."""
        if segments is None:
            self._observe(layer_idx, selection, teacher, attention_mask, 0)
            return
        for segment in segments:
            rows, keys = segment.local, slice(0, segment.global_stop)
            topk = None if selection.topk_indices is None else selection.topk_indices[:, rows]
            self._observe(
                layer_idx,
                replace(selection, topk_indices=topk),
                teacher_rows(teacher, rows, keys),
                None if attention_mask is None else attention_mask[:, keys],
                segment.global_start,
            )

    def _observe(
        self,
        layer_idx: int,
        selection: IndexerSelection,
        teacher: TeacherInputs,
        attention_mask: Tensor | None,
        query_offset: int,
    ) -> None:
        query = teacher.query
        batch, seq = query.shape[0], query.shape[2]
        topk = selection.topk_indices
        if topk is None:
            if self.topk is None:
                raise ValueError("a dense forward computes no top-k: give LayerStatsObserver(topk=K) for the overlap")
            # No attended set: score an empty one (all -1); only the sampled dense top-k is kept.
            width = min(self.topk, self.sequence_length or seq)  # the whole sequence's K, whatever run this is
            topk = torch.full((batch, seq, width), -1, dtype=torch.long, device=query.device)
        positions = None
        if self.sample_rows_per_sequence > 0:
            whole = self.sequence_length or seq
            positions = sample_rows(whole, topk.shape[-1], self.sample_rows_per_sequence).to(query.device)
            # This run's rows among them, as local rows (every rank's runs together take each sampled row once).
            positions = positions[(positions >= query_offset) & (positions < query_offset + seq)] - query_offset
        with torch.no_grad():
            stats, sampled = chunked_layer_stats(
                teacher, topk, attention_mask, self.chunk_size, positions, query_offset=query_offset
            )
        if selection.topk_indices is not None:
            self.stats.setdefault(layer_idx, LayerStats()).add(stats)
        if sampled is not None:
            self.sampled_topk.setdefault(layer_idx, []).append(sampled.reshape(-1, sampled.shape[-1]).cpu())

    def overlap(self) -> Tensor:
        hits, rows = self.overlap_sums()
        return hits / rows

    def overlap_sums(self) -> tuple[Tensor, Tensor]:
        """`overlap_sums` of the sampled rows (for a reduction over ranks)."""
        layers = sorted(self.sampled_topk)
        if layers != list(range(len(layers))):
            raise ValueError(f"overlap needs every layer from 0 sampled, got {layers}")
        return overlap_sums([torch.cat(self.sampled_topk[layer]) for layer in layers])

    def metrics(self, prefix: str = "indexcache") -> dict[str, float]:
        """Per-layer recall and coverage plus the furthest-layer summary (`layer_metrics`) of what was observed."""
        layers = sorted(self.stats)
        return layer_metrics(
            {layer: self.stats[layer].recall for layer in layers},
            {layer: self.stats[layer].coverage for layer in layers},
            prefix,
        )


def layer_metrics(recall: dict[int, float], coverage: dict[int, float], prefix: str = "indexcache") -> dict[str, float]:
    """`{prefix}/recall/layer_{i}`, `{prefix}/coverage/layer_{i}`, and which layer is furthest from its teacher.

    `{prefix}/furthest_layer` is the layer whose attended set misses the most of its own dense attention mass
    (lowest coverage; ties: the lowest layer), with its `_coverage` and `_recall`; `mean_recall`/`mean_coverage`
    average over layers. Pure, so multi-rank callers can reduce the per-layer values first and call it after.
    """
    out: dict[str, float] = {}
    for layer in sorted(recall):
        out[f"{prefix}/recall/layer_{layer}"] = recall[layer]
        out[f"{prefix}/coverage/layer_{layer}"] = coverage[layer]
    if recall:
        worst = min(sorted(coverage), key=lambda layer: coverage[layer])
        out[f"{prefix}/furthest_layer"] = float(worst)
        out[f"{prefix}/furthest_layer_coverage"] = coverage[worst]
        out[f"{prefix}/furthest_layer_recall"] = recall[worst]
        out[f"{prefix}/mean_recall"] = sum(recall.values()) / len(recall)
        out[f"{prefix}/mean_coverage"] = sum(coverage.values()) / len(coverage)
    return out


@torch.no_grad()
def attention_metrics(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Per-layer recall/coverage of one batch in the model's pattern (sparse mode), for evaluation steps.

    `model` is an `IndexCacheModel` or a DeepSpeed engine wrapping one (its forward takes `observer=`). Returns
    `indexcache/recall/layer_{i}`, `indexcache/coverage/layer_{i}` for every layer (S layers are the ones that
    reuse another layer's top-k) and the `indexcache/furthest_layer*` summary. One extra sparse forward; a caller
    that already runs one can pass `observer=LayerStatsObserver()` to it instead and read `.metrics()`.
    """
    observer = LayerStatsObserver(chunk_size=chunk_size)
    model(input_ids=input_ids, attention_mask=attention_mask, mode="sparse", observer=observer)
    return observer.metrics()
