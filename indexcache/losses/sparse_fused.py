"""Triton kernels of the gathered sparse KL (`sparse.SparseGroupKL`); imported lazily, on CUDA only.

One program per query row. It loads the row's indexer queries [H_I, D_I] and head weights once, then walks the
row's K slots in blocks, gathering the slots' indexer keys (the whole indexer key cache of a 32K window, 8 MB in
bf16, stays in L2) and scoring them on the tensor cores:

- `student_layer_stats`: one served layer's row sums against the student, in one pass over the row's slots and
  nothing of size [B, T, K] written: the logits I[t, k] = sum_j w[t, j] relu(q[t, j] . k[slot]) with their running
  log-sum-exp, and the teacher's sums p.I, p and p log p, which give the row's KL(p || q) and entropy;
- `student_gradients`: with the row's student LSE and the mean teacher p_bar, d I = (q - p_bar) * row weight, and
  from it dw (per row), dq (per row) and dk (scattered to the slots' keys with atomic adds, float32).
O(T * K * H_I * D_I) work, nothing of size [T, T]. The PyTorch path in `sparse.py` is the reference they are
tested against (tests/test_sparse_gpu.py, bench/interpret_sparse.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from indexcache.kernels.config import SparseKLTiling

DEFAULT_TILING = SparseKLTiling()  # a model passes its own (`KernelConfig.sparse_kl`); nobody reassigns this


def fused_sparse_kl_supports(q: Tensor, k: Tensor, w: Tensor) -> bool:
    """CUDA, bf16/fp16/fp32 q and k of one dtype, D_I a power of two in [16, 256], unit stride in the widths."""
    if not (q.is_cuda and k.is_cuda and w.is_cuda) or q.dtype != k.dtype:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    idx_dim = q.shape[-1]
    if idx_dim < 16 or idx_dim & (idx_dim - 1) or idx_dim > 256:
        return False
    return q.stride(-1) == 1 and k.stride(-1) == 1 and w.stride(-1) == 1


@triton.jit
def _row_scores(q_row, k_base, slots, valid, heads, head_in, s_qj, s_kt, D: tl.constexpr):
    """[BLOCK_H, BLOCK_K] q.k of a row's indexer heads against its gathered slot keys, and the key tile."""
    d = tl.arange(0, D)
    q = tl.load(q_row + heads[:, None] * s_qj + d[None, :], mask=head_in[:, None], other=0.0)
    keys = tl.load(
        k_base + tl.maximum(slots, 0).to(tl.int64)[:, None] * s_kt + d[None, :], mask=valid[:, None], other=0.0
    )
    return tl.dot(q, tl.trans(keys)), q, keys


@triton.jit
def _layer_stats_kernel(
    q_ptr, k_ptr, w_ptr, slot_ptr, p_ptr, lse_ptr, kl_ptr, entropy_ptr,
    num_slots, num_heads,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_ib, s_it, s_pb, s_pt, s_ob,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    head_in = heads < num_heads
    q_row = q_ptr + b * s_qb + t * s_qt
    w = tl.load(w_ptr + b * s_wb + t * s_wt + heads, mask=head_in, other=0.0).to(tl.float32)
    k_base = k_ptr + b * s_kb
    run_max = tl.full((), float("-inf"), tl.float32)  # the logits' running max and sum of exp (online LSE)
    run_sum = tl.zeros((), tl.float32)
    p_dot_logits = tl.zeros((), tl.float32)
    p_mass = tl.zeros((), tl.float32)
    p_log_p = tl.zeros((), tl.float32)
    for start in range(0, num_slots, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        slots = tl.load(slot_ptr + b * s_ib + t * s_it + ks, mask=ks < num_slots, other=-1)
        valid = slots >= 0
        scores, _, _ = _row_scores(q_row, k_base, slots, valid, heads, head_in, s_qj, s_kt, D)
        logits = tl.where(valid, tl.sum(w[:, None] * tl.maximum(scores, 0.0), 0), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no valid slot yet: every exp below is 0
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift), 0)
        run_max = new_max
        p = tl.load(p_ptr + b * s_pb + t * s_pt + ks, mask=valid, other=0.0)  # 0 on -1 slots by contract
        p_dot_logits += tl.sum(p * tl.where(valid, logits, 0.0), 0)
        p_mass += tl.sum(p, 0)
        p_log_p += tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), 0)
    has_slot = run_sum > 0
    lse = tl.where(has_slot, run_max + tl.log(tl.where(has_slot, run_sum, 1.0)), float("-inf"))
    # sum_k p log q = p.I - LSE * sum_k p over the valid slots (a row without a slot has log q = 0 there, as p = 0).
    p_log_q = tl.where(has_slot, p_dot_logits - tl.where(has_slot, lse, 0.0) * p_mass, 0.0)
    tl.store(lse_ptr + b * s_ob + t, lse)
    tl.store(kl_ptr + b * s_ob + t, p_log_p - p_log_q)
    tl.store(entropy_ptr + b * s_ob + t, -p_log_p)


@triton.jit
def _grad_kernel(
    q_ptr, k_ptr, w_ptr, slot_ptr, lse_ptr, p_ptr, row_weight_ptr, dq_ptr, dk_ptr, dw_ptr,
    num_slots, num_heads,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_ib, s_it, s_lb, s_pb, s_pt, s_rb,
    s_dqb, s_dqt, s_dqj, s_dkb, s_dkt, s_dwb, s_dwt,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    # Padding rows and rows without a slot have weight 0: their d I is 0, so they add nothing anywhere.
    row_weight = tl.load(row_weight_ptr + b * s_rb + t)
    heads = tl.arange(0, BLOCK_H)
    head_in = heads < num_heads
    d = tl.arange(0, D)
    q_row = q_ptr + b * s_qb + t * s_qt
    w = tl.load(w_ptr + b * s_wb + t * s_wt + heads, mask=head_in, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + b * s_lb + t)
    k_base = k_ptr + b * s_kb
    dq = tl.zeros([BLOCK_H, D], tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    for start in range(0, num_slots, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        slots = tl.load(slot_ptr + b * s_ib + t * s_it + ks, mask=ks < num_slots, other=-1)
        valid = slots >= 0
        scores, q, keys = _row_scores(q_row, k_base, slots, valid, heads, head_in, s_qj, s_kt, D)
        relu = tl.maximum(scores, 0.0)
        logits = tl.sum(w[:, None] * relu, 0)
        p_bar = tl.load(p_ptr + b * s_pb + t * s_pt + ks, mask=valid, other=0.0)
        student = tl.where(valid, tl.exp(tl.where(valid, logits - lse, 0.0)), 0.0)
        d_logits = (student - p_bar) * row_weight
        dw += tl.sum(relu * d_logits[None, :], 1)
        d_scores = tl.where(scores > 0, w[:, None] * d_logits[None, :], 0.0)
        dq += tl.dot(d_scores.to(keys.dtype), keys)
        d_keys = tl.dot(tl.trans(d_scores).to(q.dtype), q)
        rows = tl.maximum(slots, 0).to(tl.int64)
        # Relaxed: only the sums matter. The default (acq_rel) fences every atomic add.
        dk_rows = dk_ptr + b * s_dkb + rows[:, None] * s_dkt + d[None, :]
        tl.atomic_add(dk_rows, d_keys, mask=valid[:, None], sem="relaxed")
    tl.store(dq_ptr + b * s_dqb + t * s_dqt + heads[:, None] * s_dqj + d[None, :], dq, mask=head_in[:, None])
    tl.store(dw_ptr + b * s_dwb + t * s_dwt + heads, dw, mask=head_in)


def _block_heads(num_heads: int) -> int:
    return max(16, triton.next_power_of_2(num_heads))


def student_layer_stats(
    q: Tensor, k: Tensor, w: Tensor, slots: Tensor, probs: Tensor, tiling: SparseKLTiling = DEFAULT_TILING
) -> tuple[Tensor, Tensor, Tensor]:
    """One served layer against the student, per row, float32 [B, T] each: KL(p || q), the teacher's entropy, and
    the student's log-sum-exp over the row's slots (-inf for a row without one). `probs` [B, T, K] float32."""
    batch, seq, num_heads, idx_dim = q.shape
    probs = probs.float().contiguous()
    lse, kl, entropy = (torch.empty(batch, seq, dtype=torch.float32, device=q.device) for _ in range(3))
    _layer_stats_kernel[(seq, batch)](
        q, k, w, slots, probs, lse, kl, entropy,
        slots.shape[-1], num_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        slots.stride(0), slots.stride(1), probs.stride(0), probs.stride(1), lse.stride(0),
        D=idx_dim, BLOCK_H=_block_heads(num_heads), BLOCK_K=tiling.block_slots, num_warps=tiling.warps,
    )  # fmt: skip
    return kl, entropy, lse


def student_gradients(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    slots: Tensor,
    lse: Tensor,
    p_bar: Tensor,
    row_weight: Tensor,
    tiling: SparseKLTiling = DEFAULT_TILING,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dw (float32) of sum_rows row_weight * KL(p_bar || q) w.r.t. the indexer outputs.

    `lse` [B, T] is each row's student log-sum-exp over its slots, `p_bar` [B, T, K] the mean teacher,
    `row_weight` [B, T] float32 (1/N on valid rows, 0 elsewhere).
    """
    batch, seq, num_heads, idx_dim = q.shape
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    # Rows without a slot have LSE -inf; they have weight 0, and a finite stand-in keeps the kernel's exp finite.
    lse = torch.where(torch.isfinite(lse), lse, 0.0).float().contiguous()
    p_bar, row_weight = p_bar.float().contiguous(), row_weight.float().contiguous()
    _grad_kernel[(seq, batch)](
        q, k, w, slots, lse, p_bar, row_weight, dq, dk, dw,
        slots.shape[-1], num_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        slots.stride(0), slots.stride(1), lse.stride(0), p_bar.stride(0), p_bar.stride(1), row_weight.stride(0),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dw.stride(0), dw.stride(1),
        D=idx_dim, BLOCK_H=_block_heads(num_heads), BLOCK_K=tiling.block_slots, num_warps=tiling.warps,
    )  # fmt: skip
    return dq, dk, dw
