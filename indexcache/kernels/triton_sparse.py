"""Triton kernels of the gather-based sparse attention (forward, teacher pass, backward); imported lazily, CUDA only.

One program per (query row, block of query heads sharing a KV head, block of value columns). It loads the row's
queries once, then walks the row's K slots in blocks: gathers the slots' key rows straight from global memory
(in the MLA latent form one 576-wide row serves every head, and the whole latent cache of a 32K window, 38 MB in
bf16, stays in the H200's L2), scores them on the tensor cores, and keeps an online softmax. No mask and no
[T, T] buffer: a slot is attended iff it is >= 0 (`visible_slots` made sure of causality, padding and repeats).

- `_sparse_forward_kernel`: output [B, T, H, D_v] (input dtype) and LSE [B, T, H] (natural log, float32).
  In the latent form the value is the key's first 512 columns; `V_IS_K` reuses the key tile already loaded.
- `_sparse_probs_kernel`: the teacher, (1/H) sum_h exp(score - LSE) per slot, [B, T, K] float32 (atomics add the
  head blocks of a row together).
- `_sparse_backward_kernel` (only the base-training sparse stage needs it): one program per (query row, head
  block), over the whole value width, recomputes P = exp(scaling * q.k - LSE) from the forward's LSE, takes
  delta = rowsum(dO * O) from the row's output, dP = dO V^T and dS = P (dP - delta) scaling; dQ = dS K is the
  program's own (written once), while dK += dS^T Q and dV += P^T dO go to every gathered key row, added with
  float32 atomics into [B * T, H_kv, D] buffers. In the latent form the value's gradient is added to the key
  tile's before the one atomic add (the caller returns it as the key's; autograd would have added it there
  through the view). A row whose LSE is -inf (no slot) gets P = 0, so zero gradients. Its tiles are wider than the
  forward's (dQ in float32, the row's dO): wide rows (the MLA latent) take 32 heads per program (`backward_config`).
  `sparse_attention._reference_backward` is the exact slow path.
Widths: D = D1 + D2 with D1 the largest power of two <= D and the rest padded to a power of two
(576 = 512 + 64), so the kernel computes no padding columns for the model shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass
class SparseKernelConfig:
    """Block shapes; bench/e2e.py times variants (bench/NOTES.md has the measurements)."""

    block_heads: int = 64  # query heads per program (at most, and padded to at least 16 for tl.dot)
    block_slots: int = 64  # slots per step (32K, H200: 64 -> 39 ms, 32 -> 52, 16 -> 82; bench/NOTES.md)
    block_value: int = 512  # forward: value columns per program (< D_v: several programs re-score the same keys)
    warps: int = 8
    stages: int = 2


CONFIG = SparseKernelConfig()
# The backward keeps dQ [BLOCK_H, D] in float32 and the row's dO beside the forward's tiles: smaller slot steps.
BACKWARD_CONFIG = SparseKernelConfig(block_slots=32, stages=1)
# Rows wider than this many bytes (q.k width padded to its two tiles, plus the value's tile) take WIDE_BACKWARD_CONFIG:
# at the MLA latent width (576 + 512, bf16) 64 heads per program need 306-312 KiB of shared memory whatever the slot
# step, and sm_90 has 227 KiB. 32 heads and 32-slot steps need 132 KiB and spill 172 B; on an H200 they ran the GLM-5
# latent backward 1.3x faster than 16-slot steps (which need 102 KiB, 8 B spill) at 8K and 32K (bench/NOTES.md,
# "Sparse backward"; tests/test_sparse_compile.py checks every project shape).
WIDE_BACKWARD_BYTES = 576 * 2  # 320 + 256 columns in bf16: 168 KiB at 64 heads, the widest screened that fits
WIDE_BACKWARD_CONFIG = SparseKernelConfig(block_heads=32, block_slots=32, stages=1)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _split_width(dim: int) -> tuple[int, int]:
    main = 1 << (dim.bit_length() - 1)
    rest = dim - main
    return main, (0 if rest == 0 else max(16, triton.next_power_of_2(rest)))


def triton_supports(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Shapes and dtypes the kernels handle: CUDA, one dtype, q.k width >= 16, key rows contiguous in the width."""
    tensors = (query, key, value)
    if not all(x.is_cuda for x in tensors) or query.dtype not in _DTYPES:
        return False
    if any(x.dtype != query.dtype or x.stride(-1) != 1 for x in tensors):
        return False
    return query.shape[-1] >= 16 and value.shape[-1] >= 16


def _value_is_key_columns(key: Tensor, value: Tensor, d1: int) -> bool:
    """Whether the value is the key's first D1 columns in memory (the latent form), so the key tile serves as both."""
    return value.data_ptr() == key.data_ptr() and value.stride() == key.stride() and value.shape[-1] == d1


def backward_config(dim: int, value_dim: int, dtype: torch.dtype) -> SparseKernelConfig:
    """The backward's block shapes for a q.k width, a value width and a dtype: fewer heads per program for wide rows."""
    d1, d2 = _split_width(dim)
    row_bytes = (d1 + d2 + triton.next_power_of_2(value_dim)) * dtype.itemsize
    return WIDE_BACKWARD_CONFIG if row_bytes > WIDE_BACKWARD_BYTES else BACKWARD_CONFIG


def _head_blocks(heads_per_kv: int, cfg: SparseKernelConfig) -> tuple[int, int]:
    block = max(16, min(cfg.block_heads, triton.next_power_of_2(heads_per_kv)))
    return block, triton.cdiv(heads_per_kv, block)


@triton.jit
def _row_scores(
    q1, q2, k_base, slots_valid, rows, s_kt,
    D1: tl.constexpr, D2: tl.constexpr, D_REST: tl.constexpr,
):  # fmt: skip
    """Scores [BLOCK_H, BLOCK_K] of a row's query heads against the gathered key rows, and both key tiles."""
    d1 = tl.arange(0, D1)
    k1 = tl.load(k_base + rows[:, None] * s_kt + d1[None, :], mask=slots_valid[:, None], other=0.0)
    scores = tl.dot(q1, tl.trans(k1))
    k2 = k1
    if D2 > 0:
        d2 = tl.arange(0, D2)
        k2 = tl.load(
            k_base + rows[:, None] * s_kt + D1 + d2[None, :],
            mask=slots_valid[:, None] & (d2[None, :] < D_REST),
            other=0.0,
        )
        scores += tl.dot(q2, tl.trans(k2))
    return scores, k1, k2


@triton.jit
def _load_queries(q_row, heads, head_in, s_qh, D1: tl.constexpr, D2: tl.constexpr, D_REST: tl.constexpr):
    d1 = tl.arange(0, D1)
    q1 = tl.load(q_row + heads[:, None] * s_qh + d1[None, :], mask=head_in[:, None], other=0.0)
    q2 = q1
    if D2 > 0:
        d2 = tl.arange(0, D2)
        q2 = tl.load(
            q_row + heads[:, None] * s_qh + D1 + d2[None, :], mask=head_in[:, None] & (d2[None, :] < D_REST), other=0.0
        )
    return q1, q2


@triton.jit
def _sparse_forward_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, out_ptr, lse_ptr,
    num_slots, heads_per_kv, head_blocks, value_blocks, scale_log2,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ib, s_it, s_ob, s_ot, s_oh, s_lb, s_lt,
    D1: tl.constexpr, D2: tl.constexpr, D_REST: tl.constexpr, DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, V_IS_K: tl.constexpr,
):  # fmt: skip
    t, pid, b = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    value_block = pid % value_blocks
    head_block = (pid // value_blocks) % head_blocks
    kv = pid // (value_blocks * head_blocks)
    local = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_in = local < heads_per_kv
    heads = kv * heads_per_kv + local
    q1, q2 = _load_queries(q_ptr + b * s_qb + t * s_qt, heads, head_in, s_qh, D1, D2, D_REST)
    k_base = k_ptr + b * s_kb + kv * s_kh
    v_base = v_ptr + b * s_vb + kv * s_vh
    dv = value_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    slot_row = slot_ptr + b * s_ib + t * s_it
    for start in range(0, num_slots, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        slots = tl.load(slot_row + ks, mask=ks < num_slots, other=-1)
        valid = slots >= 0
        rows = tl.maximum(slots, 0).to(tl.int64)
        scores, k1, _ = _row_scores(q1, q2, k_base, valid, rows, s_kt, D1, D2, D_REST)
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        alpha = tl.exp2(running_max - safe_max)
        running_sum = running_sum * alpha + tl.sum(probs, 1)
        if V_IS_K:
            values = k1
        else:
            values = tl.load(
                v_base + rows[:, None] * s_vt + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0
            )
        acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values)
        running_max = new_max
    has_key = running_sum > 0
    out = acc / tl.where(has_key, running_sum, 1.0)[:, None]
    out_ptrs = out_ptr + b * s_ob + t * s_ot + heads[:, None] * s_oh + dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_in[:, None] & (dv[None, :] < DV))
    if value_block == 0:
        lse = tl.where(
            has_key, (running_max + tl.log2(tl.where(has_key, running_sum, 1.0))) * 0.6931471805599453, float("-inf")
        )
        tl.store(lse_ptr + b * s_lb + t * s_lt + heads, lse, mask=head_in)


@triton.jit
def _sparse_probs_kernel(
    q_ptr, k_ptr, slot_ptr, lse_ptr, probs_ptr,
    num_slots, heads_per_kv, head_blocks, scale_log2, inv_heads,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_ib, s_it, s_lb, s_lt, s_pb, s_pt,
    D1: tl.constexpr, D2: tl.constexpr, D_REST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    t, pid, b = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    head_block = pid % head_blocks
    kv = pid // head_blocks
    local = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_in = local < heads_per_kv
    heads = kv * heads_per_kv + local
    q1, q2 = _load_queries(q_ptr + b * s_qb + t * s_qt, heads, head_in, s_qh, D1, D2, D_REST)
    lse = tl.load(lse_ptr + b * s_lb + t * s_lt + heads, mask=head_in, other=float("-inf")) * 1.4426950408889634
    # Heads with no key (or padding heads of the block) add nothing: their LSE is -inf.
    head_ok = lse > float("-inf")
    lse = tl.where(head_ok, lse, 0.0)
    k_base = k_ptr + b * s_kb + kv * s_kh
    slot_row = slot_ptr + b * s_ib + t * s_it
    out_row = probs_ptr + b * s_pb + t * s_pt
    for start in range(0, num_slots, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        slots = tl.load(slot_row + ks, mask=ks < num_slots, other=-1)
        valid = slots >= 0
        rows = tl.maximum(slots, 0).to(tl.int64)
        scores, _, _ = _row_scores(q1, q2, k_base, valid, rows, s_kt, D1, D2, D_REST)
        probs = tl.exp2(scores * scale_log2 - lse[:, None])
        probs = tl.where(head_ok[:, None] & valid[None, :], probs, 0.0)
        head_mean = tl.sum(probs, 0) * inv_heads
        if ATOMIC:
            tl.atomic_add(out_row + ks, head_mean, mask=ks < num_slots, sem="relaxed")
        else:
            tl.store(out_row + ks, head_mean, mask=ks < num_slots)


@triton.jit
def _sparse_backward_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, out_ptr, dout_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    num_keys, num_slots, heads_per_kv, head_blocks, scaling, scale_log2,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ib, s_it, s_ob, s_ot, s_oh, s_gb, s_gt, s_gh, s_lb, s_lt,
    s_dqb, s_dqt, s_dqh, s_dkt, s_dkh, s_dvt, s_dvh,
    D1: tl.constexpr, D2: tl.constexpr, D_REST: tl.constexpr, DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, V_IS_K: tl.constexpr,
    DV_INTO_DK: tl.constexpr,
):  # fmt: skip
    t, pid, b = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    head_block = pid % head_blocks
    kv = pid // head_blocks
    local = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_in = local < heads_per_kv
    heads = kv * heads_per_kv + local
    q1, q2 = _load_queries(q_ptr + b * s_qb + t * s_qt, heads, head_in, s_qh, D1, D2, D_REST)
    dv = tl.arange(0, BLOCK_DV)
    row_mask = head_in[:, None] & (dv[None, :] < DV)
    d_out = tl.load(dout_ptr + b * s_gb + t * s_gt + heads[:, None] * s_gh + dv[None, :], mask=row_mask, other=0.0)
    out = tl.load(out_ptr + b * s_ob + t * s_ot + heads[:, None] * s_oh + dv[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(d_out.to(tl.float32) * out.to(tl.float32), 1)  # rowsum(dO * O) [BLOCK_H]
    lse = tl.load(lse_ptr + b * s_lb + t * s_lt + heads, mask=head_in, other=float("-inf")) * 1.4426950408889634
    # A head with no key (LSE -inf) or a padding head of the block gets P = 0, so dS = 0: zero gradients, no NaN.
    head_ok = lse > float("-inf")
    lse = tl.where(head_ok, lse, 0.0)
    k_base = k_ptr + b * s_kb + kv * s_kh
    v_base = v_ptr + b * s_vb + kv * s_vh
    # dK and dV are float32 [B * S, H_kv, width] buffers (S keys): batch b's rows start at b * S.
    dk_base = dk_ptr + b * num_keys * s_dkt + kv * s_dkh
    dv_base = dv_ptr + b * num_keys * s_dvt + kv * s_dvh
    d1 = tl.arange(0, D1)
    dq1 = tl.zeros([BLOCK_H, D1], tl.float32)
    dq2 = dq1  # the remainder columns' dQ, when there are any
    if D2 > 0:
        dq2 = tl.zeros([BLOCK_H, D2], tl.float32)
    slot_row = slot_ptr + b * s_ib + t * s_it
    for start in range(0, num_slots, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        slots = tl.load(slot_row + ks, mask=ks < num_slots, other=-1)
        valid = slots >= 0
        rows = tl.maximum(slots, 0).to(tl.int64)
        scores, k1, k2 = _row_scores(q1, q2, k_base, valid, rows, s_kt, D1, D2, D_REST)
        probs = tl.exp2(scores * scale_log2 - lse[:, None])
        probs = tl.where(head_ok[:, None] & valid[None, :], probs, 0.0)
        if V_IS_K:
            values = k1
        else:
            values = tl.load(
                v_base + rows[:, None] * s_vt + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0
            )
        d_probs = tl.dot(d_out, tl.trans(values))
        d_scores = (probs * (d_probs - delta[:, None]) * scaling).to(q1.dtype)
        dq1 += tl.dot(d_scores, k1)
        d_key1 = tl.dot(tl.trans(d_scores), q1)
        d_value = tl.dot(tl.trans(probs.to(d_out.dtype)), d_out)
        if DV_INTO_DK:  # the value is the key's first D1 columns, and autograd adds its gradient to the key's
            d_key1 += d_value
        else:
            tl.atomic_add(
                dv_base + rows[:, None] * s_dvt + dv[None, :],
                d_value,
                mask=valid[:, None] & (dv[None, :] < DV),
                sem="relaxed",  # only the sums matter, no ordering: no fences
            )
        tl.atomic_add(dk_base + rows[:, None] * s_dkt + d1[None, :], d_key1, mask=valid[:, None], sem="relaxed")
        if D2 > 0:
            d2 = tl.arange(0, D2)
            dq2 += tl.dot(d_scores, k2)
            d_key2 = tl.dot(tl.trans(d_scores), q2)
            tl.atomic_add(
                dk_base + rows[:, None] * s_dkt + D1 + d2[None, :],
                d_key2,
                mask=valid[:, None] & (d2[None, :] < D_REST),
                sem="relaxed",
            )
    dq_row = dq_ptr + b * s_dqb + t * s_dqt + heads[:, None] * s_dqh
    tl.store(dq_row + d1[None, :], dq1.to(dq_ptr.dtype.element_ty), mask=head_in[:, None])
    if D2 > 0:
        d2 = tl.arange(0, D2)
        tl.store(
            dq_row + D1 + d2[None, :], dq2.to(dq_ptr.dtype.element_ty), mask=head_in[:, None] & (d2[None, :] < D_REST)
        )


def triton_sparse_forward(
    query: Tensor, key: Tensor, value: Tensor, slots: Tensor, scaling: float, cfg: SparseKernelConfig = CONFIG
) -> tuple[Tensor, Tensor]:
    """Output [B, T, H, D_v] and LSE [B, T, H] float32 of `sparse_attention` (see the module doc)."""
    batch, seq, heads, dim = query.shape
    kv_heads, value_dim = value.shape[2], value.shape[3]
    heads_per_kv = heads // kv_heads
    block_h, head_blocks = _head_blocks(heads_per_kv, cfg)
    d1, d2 = _split_width(dim)
    block_dv = min(cfg.block_value, triton.next_power_of_2(value_dim))
    value_blocks = triton.cdiv(value_dim, block_dv)
    # The latent form: the value is a view of the key's leading columns, and one value block covers the key tile.
    v_is_k = _value_is_key_columns(key, value, d1) and block_dv == d1
    out = torch.empty(batch, seq, heads, value_dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch, seq, heads, dtype=torch.float32, device=query.device)
    grid = (seq, kv_heads * head_blocks * value_blocks, batch)
    _sparse_forward_kernel[grid](
        query, key, value, slots, out, lse,
        slots.shape[-1], heads_per_kv, head_blocks, value_blocks, scaling * LOG2E,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), slots.stride(0), slots.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        D1=d1, D2=d2, D_REST=dim - d1, DV=value_dim, BLOCK_H=block_h, BLOCK_K=cfg.block_slots, BLOCK_DV=block_dv,
        V_IS_K=v_is_k, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return out, lse


def triton_sparse_probs(
    query: Tensor, key: Tensor, slots: Tensor, lse: Tensor, scaling: float, cfg: SparseKernelConfig = CONFIG
) -> Tensor:
    """[B, T, K] float32 head-averaged probabilities of `sparse_attention_probs` (see the module doc)."""
    batch, seq, heads, dim = query.shape
    kv_heads = key.shape[2]
    heads_per_kv = heads // kv_heads
    block_h, head_blocks = _head_blocks(heads_per_kv, cfg)
    d1, d2 = _split_width(dim)
    atomic = kv_heads * head_blocks > 1
    probs = (torch.zeros if atomic else torch.empty)(slots.shape, dtype=torch.float32, device=query.device)
    lse = lse.float()
    grid = (seq, kv_heads * head_blocks, batch)
    _sparse_probs_kernel[grid](
        query, key, slots, lse, probs,
        slots.shape[-1], heads_per_kv, head_blocks, scaling * LOG2E, 1.0 / heads,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        slots.stride(0), slots.stride(1), lse.stride(0), lse.stride(1), probs.stride(0), probs.stride(1),
        D1=d1, D2=d2, D_REST=dim - d1, BLOCK_H=block_h, BLOCK_K=cfg.block_slots, ATOMIC=atomic,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return probs


def triton_sparse_backward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    slots: Tensor,
    out: Tensor,
    d_out: Tensor,
    lse: Tensor,
    scaling: float,
    value_into_key: bool,
    cfg: SparseKernelConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """dQ, dK and dV of `sparse_attention` given the forward's output and LSE (see the module doc).

    `value_into_key`: the value is an autograd view of the key's first D_v columns (the MLA latent form), so the
    value's gradient is added into dK's first D_v columns and dV is returned as None (autograd would add it there).
    `cfg`: block shapes, by default `backward_config` of the widths and dtype.
    """
    batch, seq, heads, dim = query.shape
    kv_heads, value_dim = value.shape[2], value.shape[3]
    if cfg is None:
        cfg = backward_config(dim, value_dim, query.dtype)
    heads_per_kv = heads // kv_heads
    block_h, head_blocks = _head_blocks(heads_per_kv, cfg)
    d1, d2 = _split_width(dim)
    block_dv = triton.next_power_of_2(value_dim)  # the whole value row: dP needs every column
    v_is_k = _value_is_key_columns(key, value, d1)
    dv_into_dk = value_into_key and v_is_k
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    lse = lse.float()
    d_query = torch.empty_like(query)
    num_keys = key.shape[1]  # may exceed the query rows (context parallelism: the gathered keys)
    d_key = torch.zeros(batch * num_keys, kv_heads, dim, dtype=torch.float32, device=query.device)
    d_value = (
        d_key
        if dv_into_dk
        else torch.zeros(batch * num_keys, kv_heads, value_dim, dtype=torch.float32, device=query.device)
    )
    grid = (seq, kv_heads * head_blocks, batch)
    _sparse_backward_kernel[grid](
        query, key, value, slots, out, d_out, lse, d_query, d_key, d_value,
        num_keys, slots.shape[-1], heads_per_kv, head_blocks, scaling, scaling * LOG2E,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), slots.stride(0), slots.stride(1),
        out.stride(0), out.stride(1), out.stride(2), d_out.stride(0), d_out.stride(1), d_out.stride(2),
        lse.stride(0), lse.stride(1), d_query.stride(0), d_query.stride(1), d_query.stride(2),
        d_key.stride(0), d_key.stride(1), d_value.stride(0), d_value.stride(1),
        D1=d1, D2=d2, D_REST=dim - d1, DV=value_dim, BLOCK_H=block_h, BLOCK_K=cfg.block_slots, BLOCK_DV=block_dv,
        V_IS_K=v_is_k, DV_INTO_DK=dv_into_dk, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return (
        d_query,
        d_key.view(key.shape).to(key.dtype),
        None if dv_into_dk else d_value.view(value.shape).to(value.dtype),
    )
