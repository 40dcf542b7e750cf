"""Materialising reference of the multi-layer KL (docs/DESIGN.md section 1): the slow exact oracle for tests.

Every score tensor is built whole ([B, T, T] for the indexer, [B, H, T, T] per teacher) in the inputs' dtype, so
tests can run it in float64 and plain autograd supplies the gradient the fast paths are checked against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from indexcache.losses.interface import (
    IndexerOutputs,
    KLResult,
    TeacherInputs,
    key_mask,
    selected_entries,
    valid_rows,
)


def allowed_keys(real: Tensor, topk_indices: Tensor | None) -> Tensor:
    """[B, T, T] bool: key s is in row t's distribution (causal, real, and selected in the sparse variant)."""
    batch, seq = real.shape
    causal = torch.ones(seq, seq, dtype=torch.bool, device=real.device).tril()
    allowed = causal[None] & real[:, None, :]
    if topk_indices is not None:
        entries = selected_entries(topk_indices, real)
        # scatter_add of counts, then > 0, makes duplicate indices harmless.
        counts = torch.zeros(batch, seq, seq, dtype=torch.int32, device=real.device)
        counts.scatter_add_(2, topk_indices.clamp(0, seq - 1).long(), entries.int())
        allowed = allowed & (counts > 0)
    return allowed


def teacher_distribution(teacher: TeacherInputs, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T, T] head-averaged attention probabilities restricted to `allowed`."""
    num_heads, num_kv_heads = teacher.query.shape[1], teacher.key.shape[1]
    # GQA: query head h reads key head h // (H / H_kv).
    key = teacher.key.to(dtype).repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", teacher.query.to(dtype), key) * teacher.scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def reference_multi_layer_kl(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    attention_mask: Tensor | None,
    topk_indices: Tensor | None = None,
) -> KLResult:
    q, k, w = indexer.q, indexer.k, indexer.w
    batch, seq = q.shape[:2]
    dtype = q.dtype
    real = key_mask(attention_mask, batch, seq, q.device)
    rows = valid_rows(real, topk_indices)
    # Rows that carry no loss get every key so their softmax stays finite; they are weighted by zero below.
    allowed = allowed_keys(real, topk_indices) | ~rows[:, :, None]

    scores = torch.einsum("btjd,bsd->btjs", q, k.to(dtype)).relu()
    logits = (scores * w.to(dtype)[..., None]).sum(dim=2)
    log_q = logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    log_q = log_q.masked_fill(~allowed, 0.0)

    # Normalisation: every per-row quantity is summed over valid rows and divided by their count.
    num_rows = int(rows.sum())
    row_weight = rows.to(dtype) / max(num_rows, 1)
    kls, entropies = [], []
    for teacher in teachers:
        p = teacher_distribution(teacher, allowed, dtype).detach()
        p_log_p = torch.xlogy(p, p)
        kls.append(((p_log_p - p * log_q).sum(dim=-1) * row_weight).sum())
        entropies.append((-p_log_p.sum(dim=-1) * row_weight).sum())
    kl_per_layer = torch.stack(kls)
    return KLResult(
        loss=kl_per_layer.mean(),
        kl_per_layer=kl_per_layer.detach(),
        teacher_entropy=torch.stack(entropies).detach(),
        num_rows=num_rows,
    )
