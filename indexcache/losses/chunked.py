"""Chunked multi-layer KL in plain PyTorch: query rows in chunks, memory O(chunk x T) per head block.

The KL's gradient w.r.t. the indexer logits has a closed form, d(loss)/dI[t,s] = (q[t,s] - p_bar[t,s]) / N for
valid rows (p_bar: the mean of the served layers' teacher p), so each chunk computes its gradient contribution
while its scores are alive and then frees them. The autograd.Function keeps only dq, dk, dw (the size of the
inputs) for backward, which merely scales them by the incoming gradient. That is cheaper than recomputing the
chunk in backward (the teacher scores, the dominant cost, are computed once) and keeps no [chunk, T] tensor
alive across chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from indexcache.losses.interface import (
    IndexerOutputs,
    KLResult,
    TeacherInputs,
    compute_dtype,
    key_mask,
    selected_entries,
    valid_rows,
)


@dataclass
class Sums:
    """Row sums over valid rows and, when wanted, the loss's gradients (already divided by num_rows)."""

    kl: Tensor  # [G] sum over valid rows of KL(p_j || q)
    entropy: Tensor  # [G] sum over valid rows of H(p_j)
    num_rows: int
    dq: Tensor | None
    dk: Tensor | None
    dw: Tensor | None


@contextmanager
def exact_tf32(source_dtype: torch.dtype) -> Iterator[None]:
    """TF32 matmuls for products of upcast bf16/fp16 values: those are exact in TF32, so nothing is lost.

    Used only around products whose both operands are upcast inputs; other float32 products stay IEEE.
    """
    if source_dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _chunk_allowed(
    real: Tensor, rows: Tensor, topk_indices: Tensor | None, start: int, stop: int, query_offset: int = 0
) -> Tensor:
    """[B, c, query_offset + stop] bool: keys in each row's distribution for local query rows [start, stop)."""
    device = real.device
    key_stop = query_offset + stop
    query_pos = torch.arange(query_offset + start, key_stop, device=device)
    key_pos = torch.arange(key_stop, device=device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None] & real[:, None, :key_stop]
    if topk_indices is not None:
        chunk_idx = topk_indices[:, start:stop]
        # Entries already vetted for visibility (so they are < key_stop); counts > 0 tolerates duplicates.
        entries = selected_entries(chunk_idx, real, first_row=query_offset + start)
        counts = torch.zeros(allowed.shape, dtype=torch.int32, device=device)
        counts.scatter_add_(2, chunk_idx.clamp(0, key_stop - 1).long(), entries.int())
        allowed = allowed & (counts > 0)
    # Rows without loss see every key so their softmax stays finite; their weight is zero.
    return allowed | ~rows[:, start:stop, None]


def _teacher_chunk(teacher: TeacherInputs, allowed: Tensor, start: int, stop: int, dtype: torch.dtype) -> Tensor:
    """[B, c, S] head-averaged teacher probabilities for local query rows [start, stop) over the keys [0, S) of
    `allowed`, one KV head at a time."""
    key_stop = allowed.shape[-1]
    num_heads, num_kv_heads = teacher.query.shape[1], teacher.key.shape[1]
    heads_per_kv = num_heads // num_kv_heads
    blocked = ~allowed[:, None]
    p = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    for kv_head in range(num_kv_heads):
        heads = slice(kv_head * heads_per_kv, (kv_head + 1) * heads_per_kv)
        query = teacher.query[:, heads, start:stop].to(dtype)
        key = teacher.key[:, kv_head, :key_stop].to(dtype)
        with exact_tf32(teacher.query.dtype):
            scores = torch.einsum("bhcd,bsd->bhcs", query, key).mul_(teacher.scaling)
        p += scores.masked_fill_(blocked, float("-inf")).softmax(dim=-1).sum(dim=1)
    return p.div_(num_heads)


def chunked_sums(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    real: Tensor,
    rows: Tensor,
    num_rows: int,
    topk_indices: Tensor | None,
    chunk_size: int,
    want_grad: bool,
    query_offset: int = 0,
) -> Sums:
    """Row sums (and gradients divided by `num_rows`) of local rows [0, T) at global positions query_offset + t."""
    q, k, w = indexer.q, indexer.k, indexer.w
    seq = q.shape[1]
    dtype = compute_dtype(q.dtype)
    num_layers = len(teachers)
    kl = torch.zeros(num_layers, dtype=dtype, device=q.device)
    entropy = torch.zeros(num_layers, dtype=dtype, device=q.device)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device) if want_grad else None
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device) if want_grad else None
    dw = torch.zeros(w.shape, dtype=dtype, device=q.device) if want_grad else None

    for start in range(0, seq, chunk_size):
        stop = min(start + chunk_size, seq)
        key_stop = query_offset + stop  # causality: these rows never see keys at or beyond key_stop
        allowed = _chunk_allowed(real, rows, topk_indices, start, stop, query_offset)
        row_mask = rows[:, start:stop].to(dtype)
        q_chunk = q[:, start:stop].to(dtype)
        w_chunk = w[:, start:stop].to(dtype)
        k_visible = k[:, :key_stop].to(dtype)

        with exact_tf32(q.dtype):
            relu_scores = torch.einsum("bcjd,bsd->bcjs", q_chunk, k_visible).clamp_min_(0.0)
        logits = torch.einsum("bcjs,bcj->bcs", relu_scores, w_chunk)
        log_q = logits.masked_fill_(~allowed, float("-inf")).log_softmax(dim=-1)
        q_prob = log_q.exp()
        log_q = log_q.masked_fill_(~allowed, 0.0)

        p_bar = torch.zeros_like(q_prob)
        for layer, teacher in enumerate(teachers):
            p = _teacher_chunk(teacher, allowed, start, stop, dtype)
            p_log_p = torch.xlogy(p, p)
            kl[layer] += ((p_log_p - p * log_q).sum(dim=-1) * row_mask).sum()
            entropy[layer] -= (p_log_p.sum(dim=-1) * row_mask).sum()
            p_bar += p
        if not want_grad:
            continue
        # Gradient of (1/N) sum_rows (1/G) sum_j KL(p_j || q) w.r.t. the logits; p_bar sums to 1 on valid rows.
        d_logits = (q_prob - p_bar.div_(num_layers)) * (row_mask / max(num_rows, 1))[..., None]
        dw[:, start:stop] = torch.einsum("bcs,bcjs->bcj", d_logits, relu_scores)
        d_scores = (relu_scores > 0).to(dtype).mul_(d_logits[:, :, None]).mul_(w_chunk[..., None])
        dq[:, start:stop] = torch.einsum("bcjs,bsd->bcjd", d_scores, k_visible)
        dk[:, :key_stop] += torch.einsum("bcjs,bcjd->bsd", d_scores, q_chunk)
    return Sums(kl=kl, entropy=entropy, num_rows=num_rows, dq=dq, dk=dk, dw=dw)


class PrecomputedGradKL(torch.autograd.Function):
    """Returns (loss, kl_per_layer, entropy) from sums computed with their gradients already in hand.

    `compute()` runs inside forward (where autograd is off) and returns the sums; backward only scales the
    stored dq, dk, dw by the incoming gradient. Shared by the chunked and fused paths.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, w: Tensor, compute: Callable[[], Sums]):  # type: ignore[override]
        sums = compute()
        scale = 1.0 / max(sums.num_rows, 1)
        dtype = compute_dtype(q.dtype)  # the fused path sums in float64; report in the accumulation dtype
        kl_per_layer, entropy = (sums.kl * scale).to(dtype), (sums.entropy * scale).to(dtype)
        ctx.has_grads = sums.dq is not None
        if ctx.has_grads:
            ctx.save_for_backward(sums.dq.to(q.dtype), sums.dk.to(k.dtype), sums.dw.to(w.dtype))
        ctx.mark_non_differentiable(kl_per_layer, entropy)
        # The loss stays in the accumulation dtype: bf16 would round it by ~0.4% (its value is reported).
        return kl_per_layer.mean(), kl_per_layer, entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_kl: Tensor, _grad_entropy: Tensor):  # type: ignore[override]
        assert ctx.has_grads, "the loss was computed without gradients (no input required grad)"
        dq, dk, dw = ctx.saved_tensors
        scaled = [(grad * grad_loss).to(grad.dtype) for grad in (dq, dk, dw)]
        return scaled[0], scaled[1], scaled[2], None


def wants_grad(indexer: IndexerOutputs) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (indexer.q, indexer.k, indexer.w))


def chunked_multi_layer_kl(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    attention_mask: Tensor | None,
    topk_indices: Tensor | None = None,
    chunk_size: int = 1024,
    query_offset: int = 0,
    num_rows: int | None = None,
) -> KLResult:
    """See `indexcache.losses.multi_layer_kl` (query_offset and num_rows included)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: use a positive number of query rows")
    batch = indexer.q.shape[0]
    real = key_mask(attention_mask, batch, indexer.k.shape[1], indexer.q.device)
    rows = valid_rows(real, topk_indices, query_offset)
    # Normalisation: all per-row sums are divided by the number of valid rows (computed once, here), or by the
    # caller's global count (context parallelism: the rows of every rank).
    if num_rows is None:
        num_rows = int(rows.sum())
    detached = [TeacherInputs(t.query.detach(), t.key.detach(), t.scaling) for t in teachers]

    want_grad = wants_grad(indexer)

    def compute() -> Sums:
        return chunked_sums(indexer, detached, real, rows, num_rows, topk_indices, chunk_size, want_grad, query_offset)

    loss, kl_per_layer, entropy = PrecomputedGradKL.apply(indexer.q, indexer.k, indexer.w, compute)
    return KLResult(loss=loss, kl_per_layer=kl_per_layer, teacher_entropy=entropy, num_rows=num_rows)
