"""Fused Triton multi-layer KL (forward and backward) for CUDA; imported lazily, only where triton exists.

Passes (all accumulate in float32; inputs bf16/fp16):
  A. teacher log-sum-exp per (layer, head, row)      grid (row blocks, B*H, G), flash-style: Q stays on chip
  B. student log-sum-exp per row                       grid (row blocks, B)
  then, for each chunk of R query rows:
  C. one program per causal (row block, key block) tile: indexer logits I, every layer's head-averaged p
     (summed over heads on chip), the KL/entropy partial sums, and dI = q - p_bar, written with log2 q to
     two [R, T] fp32 scratch buffers
  D. dq, dw: one program per (row block, indexer head), looping over key blocks
  E. dk:     one program per key block, looping over the chunk's row blocks and indexer heads
No [T, T] tensor is allocated. dI for one row chunk ([R, T], with R chosen so that both buffers stay within
FusedConfig.scratch_bytes) does go through global memory. The dq accumulators of every indexer head for a row
block (BLOCK x H_I x D_I fp32, 1 MiB at 64 rows and H_I=32) cannot stay on chip, so D and E compute dq and dk
from the stored dI instead of C computing them. The gradients are computed in the forward pass (see
chunked.py): the teacher scores, the dominant cost, are then computed once per tile, not again in backward.

Sparse variant: the top-k sets become a packed bitmap [B, T, ceil(T/32)] int32 and the same kernels mask with
it. The sparse loss therefore costs the dense one plus the bit test, 1.7x dense at 32K on an H100. bench/NOTES.md
says why gathering the selected keys would be slower here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from indexcache.losses.chunked import PrecomputedGradKL, Sums, wants_grad
from indexcache.losses.interface import (
    IndexerOutputs,
    KLResult,
    TeacherInputs,
    key_mask,
    selected_entries,
    valid_rows,
)

LN2 = 0.6931471805599453
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class FusedConfig:
    """Block shapes; bench/kernel_kl.py times variants. Row blocks are multiples of column blocks."""

    lse_rows: int = 128  # passes A and B
    lse_cols: int = 128
    lse_warps: int = 8
    tile_rows: int = 128  # pass C (128 x 128 is 3x slower on H100: see bench/NOTES.md)
    tile_cols: int = 64
    tile_warps: int = 8
    tile_group: int = 8  # row blocks whose tiles run side by side, so their Q and K tiles are shared in L2
    grad_block: int = 64  # passes D and E
    grad_warps: int = 4
    stages: int = 2
    scratch_bytes: int = 512 * 2**20  # one row chunk's log2 q and dI


CONFIG = FusedConfig()


def fused_supports(indexer: IndexerOutputs, teachers: list[TeacherInputs]) -> bool:
    """Shapes and dtypes the kernels handle; anything else goes to the chunked path."""
    tensors = [indexer.q, indexer.k, indexer.w] + [x for t in teachers for x in (t.query, t.key)]
    if not all(x.is_cuda for x in tensors) or indexer.q.dtype not in _TL_DTYPES:
        return False
    if indexer.k.dtype != indexer.q.dtype:
        return False
    if any(t.query.dtype not in _TL_DTYPES or t.key.dtype != t.query.dtype for t in teachers):
        return False
    if len({t.query.dtype for t in teachers}) != 1:
        return False
    idx_dim = indexer.q.shape[-1]
    if idx_dim < 16 or idx_dim & (idx_dim - 1) or idx_dim > 256:
        return False
    first = teachers[0]
    same = all(t.query.shape == first.query.shape and t.key.shape == first.key.shape for t in teachers)
    return same and 16 <= first.query.shape[-1] <= 256


def selection_bitmap(topk_indices: Tensor, real: Tensor, rows_per_step: int = 1024) -> Tensor:
    """[B, T, ceil(T/32)] int32: bit s of row t is set iff top-k entry s is visible from t (built in row steps)."""
    batch, seq, _ = topk_indices.shape
    words = (seq + 31) // 32
    entries = selected_entries(topk_indices, real)
    bitmap = torch.empty(batch, seq, words, dtype=torch.int32, device=topk_indices.device)
    weights = 2 ** torch.arange(32, device=topk_indices.device, dtype=torch.int64)
    for start in range(0, seq, rows_per_step):
        stop = min(start + rows_per_step, seq)
        hits = torch.zeros(batch, stop - start, words * 32, dtype=torch.int8, device=topk_indices.device)
        # amax, not a plain scatter: a rejected -1 entry (clamped to key 0) must not clear a selected key 0.
        hits.scatter_reduce_(
            2, topk_indices[:, start:stop].clamp(0, seq - 1).long(), entries[:, start:stop].to(torch.int8), "amax"
        )
        packed = (hits.view(batch, stop - start, words, 32).long() * weights).sum(-1)
        bitmap[:, start:stop] = (packed - (packed >= 2**31).long() * 2**32).int()
    return bitmap


@triton.jit
def _allowed(
    rows, cols, seq_len, key_ok_ptr, bits_ptr, bits_row_stride,
    CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    """[rows, cols] bool: key in range, and as asked causal, real and (sparse) selected."""
    allowed = (cols[None, :] < seq_len) & (rows[:, None] >= 0)
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= rows[:, None])
    if MASK_KEYS:
        allowed = allowed & (tl.load(key_ok_ptr + cols, mask=cols < seq_len, other=0) != 0)[None, :]
    if SPARSE:
        in_rows = allowed & (rows[:, None] < seq_len)
        word = tl.load(bits_ptr + rows[:, None] * bits_row_stride + (cols[None, :] >> 5), mask=in_rows, other=0)
        allowed = in_rows & (((word >> (cols[None, :] & 31)) & 1) != 0)
    return allowed


@triton.jit
def _lse_update(scores, running_max, running_sum):
    """Online log2-sum-exp2 over key blocks; a row with no key so far keeps max -inf and sum 0, never NaN."""
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2(running_max - safe_max) + tl.sum(tl.exp2(scores - safe_max[:, None]), 1)
    return new_max, running_sum


@triton.jit
def _finish_lse(running_max, running_sum):
    # A row with no visible key gets lse 0 so exp2(-inf - lse) = 0 later instead of NaN; it carries no loss.
    return tl.where(running_sum > 0, running_max + tl.log2(running_sum), 0.0)


@triton.jit
def _indexer_logits(q_ptr, w_ptr, k_t, rows, row_in, num_idx_heads, s_qt, s_qj, s_wt, BLOCK_DI: tl.constexpr):
    """I[t, s] = sum_j w[t, j] relu(q[t, j] . k[s]) for one tile; k_t is [D_I, cols]."""
    di = tl.arange(0, BLOCK_DI)
    logits = tl.zeros([rows.shape[0], k_t.shape[1]], dtype=tl.float32)
    for j in range(num_idx_heads):
        q_j = tl.load(q_ptr + rows[:, None] * s_qt + j * s_qj + di[None, :], mask=row_in[:, None], other=0.0)
        w_j = tl.load(w_ptr + rows * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
        logits += w_j[:, None] * tl.maximum(tl.dot(q_j, k_t), 0.0)
    return logits


@triton.jit
def _teacher_lse_kernel(
    q_table, k_table, scale_table, lse_ptr, key_ok_ptr, bits_ptr,
    seq_len, num_heads, heads_per_kv, head_dim,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_okb, s_bitb, s_bitt,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    pid_t, pid_bh, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # int64 offsets: one teacher tensor can exceed 2^31 elements at long T.
    b, h = (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)
    first_row = pid_t * BLOCK_T
    rows = first_row + tl.arange(0, BLOCK_T)
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    q_base = tl.load(q_table + layer).to(tl.pointer_type(DTYPE)) + b * s_qb + h * s_qh
    k_base = tl.load(k_table + layer).to(tl.pointer_type(DTYPE)) + b * s_kb + (h // heads_per_kv) * s_kh
    scale2 = tl.load(scale_table + layer) * 1.4426950408889634
    d_in = d < head_dim
    q_mask = (rows[:, None] < seq_len) & d_in[None, :]
    query = tl.load(q_base + rows64[:, None] * s_qt + d[None, :], mask=q_mask, other=0.0)
    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_T], tl.float32)
    key_ok, bits = key_ok_ptr + b * s_okb, bits_ptr + b * s_bitb
    # Keys before the block are visible to every row of it: no causal test there.
    for start in range(0, first_row, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        key_t = tl.load(k_base + cols[None, :].to(tl.int64) * s_kt + d[:, None], mask=d_in[:, None], other=0.0)
        scores = tl.dot(query, key_t) * scale2
        if MASK_KEYS or SPARSE:
            allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, False, MASK_KEYS, SPARSE)
            scores = tl.where(allowed, scores, float("-inf"))
        running_max, running_sum = _lse_update(scores, running_max, running_sum)
    for start in range(first_row, first_row + BLOCK_T, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        k_mask = (cols[None, :] < seq_len) & d_in[:, None]
        key_t = tl.load(k_base + cols[None, :].to(tl.int64) * s_kt + d[:, None], mask=k_mask, other=0.0)
        scores = tl.dot(query, key_t) * scale2
        allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
        running_max, running_sum = _lse_update(tl.where(allowed, scores, float("-inf")), running_max, running_sum)
    lse_row = lse_ptr + (layer * tl.num_programs(1) + pid_bh) * seq_len
    tl.store(lse_row + rows, _finish_lse(running_max, running_sum), mask=rows < seq_len)


@triton.jit
def _student_lse_kernel(
    q_ptr, k_ptr, w_ptr, lse_ptr, key_ok_ptr, bits_ptr,
    seq_len, num_idx_heads,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_okb, s_bitb, s_bitt,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr,
    MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    pid_t, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    first_row = pid_t * BLOCK_T
    rows = first_row + tl.arange(0, BLOCK_T)
    row_in = rows < seq_len
    di = tl.arange(0, BLOCK_DI)
    q_b, w_b, key_ok, bits = q_ptr + b * s_qb, w_ptr + b * s_wb, key_ok_ptr + b * s_okb, bits_ptr + b * s_bitb
    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, first_row, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        k_t = tl.load(k_ptr + b * s_kb + cols[None, :] * s_kt + di[:, None])
        logits = _indexer_logits(q_b, w_b, k_t, rows, row_in, num_idx_heads, s_qt, s_qj, s_wt, BLOCK_DI)
        logits = logits * 1.4426950408889634
        if MASK_KEYS or SPARSE:
            allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, False, MASK_KEYS, SPARSE)
            logits = tl.where(allowed, logits, float("-inf"))
        running_max, running_sum = _lse_update(logits, running_max, running_sum)
    for start in range(first_row, first_row + BLOCK_T, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        k_t = tl.load(k_ptr + b * s_kb + cols[None, :] * s_kt + di[:, None], mask=cols[None, :] < seq_len, other=0.0)
        logits = _indexer_logits(q_b, w_b, k_t, rows, row_in, num_idx_heads, s_qt, s_qj, s_wt, BLOCK_DI)
        allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
        logits = tl.where(allowed, logits * 1.4426950408889634, float("-inf"))
        running_max, running_sum = _lse_update(logits, running_max, running_sum)
    tl.store(lse_ptr + b * seq_len + rows, _finish_lse(running_max, running_sum), mask=row_in)


@triton.jit
def _kl_tile_kernel(
    q_ptr, k_ptr, w_ptr, q_table, k_table, scale_table, teacher_lse_ptr, student_lse_ptr,
    key_ok_ptr, row_ok_ptr, bits_ptr, tiles_ptr, partial_ptr, d_logits_ptr, log2_q_ptr,
    seq_len, chunk_start, num_idx_heads, num_layers, num_heads, heads_per_kv, head_dim,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt,
    s_tqb, s_tqh, s_tqt, s_tkb, s_tkh, s_tkt,
    s_okb, s_bitb, s_bitt, s_gb, s_gt,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr,
    BLOCK_D: tl.constexpr, MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row_block, col_block = tl.load(tiles_ptr + 2 * pid), tl.load(tiles_ptr + 2 * pid + 1)
    rows = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = col_block * BLOCK_S + tl.arange(0, BLOCK_S)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)  # teacher offsets can exceed 2^31 at long T
    row_in = rows < seq_len
    di = tl.arange(0, BLOCK_DI)
    d = tl.arange(0, BLOCK_D)
    key_ok, bits = key_ok_ptr + b * s_okb, bits_ptr + b * s_bitb
    row_ok = tl.load(row_ok_ptr + b * s_okb + rows, mask=row_in, other=0) != 0
    # Only the head loop's accumulator stays in registers: log2 q and dI live in this tile's slice of the
    # chunk scratch (L1/L2-resident, touched once per layer), which frees registers for the head loop.
    tile = b * s_gb + (rows[:, None] - chunk_start) * s_gt + cols[None, :]

    k_t = tl.load(k_ptr + b * s_kb + cols[None, :] * s_kt + di[:, None], mask=cols[None, :] < seq_len, other=0.0)
    logits = _indexer_logits(
        q_ptr + b * s_qb, w_ptr + b * s_wb, k_t, rows, row_in, num_idx_heads, s_qt, s_qj, s_wt, BLOCK_DI
    )
    student_lse = tl.load(student_lse_ptr + b * seq_len + rows, mask=row_in, other=0.0)
    allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
    log2_q = tl.where(allowed, logits * 1.4426950408889634 - student_lse[:, None], 0.0)
    tl.store(log2_q_ptr + tile, log2_q, mask=row_in[:, None])
    if WRITE_GRAD:
        # dI * N starts as q; each layer subtracts p_layer / G. The 1/N is applied to the float32
        # accumulators of passes D and E (keeps fp16 off subnormals).
        tl.store(d_logits_ptr + tile, tl.where(allowed & row_ok[:, None], tl.exp2(log2_q), 0.0), mask=row_in[:, None])

    part = partial_ptr + (pid * tl.num_programs(1) + b) * num_layers * 2
    for layer in range(num_layers):
        q_base = tl.load(q_table + layer).to(tl.pointer_type(DTYPE)) + b * s_tqb
        k_base = tl.load(k_table + layer).to(tl.pointer_type(DTYPE)) + b * s_tkb
        scale2 = tl.load(scale_table + layer) * 1.4426950408889634
        lse_base = teacher_lse_ptr + (layer * tl.num_programs(1) + b) * num_heads * seq_len
        p_layer = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
        # The head sum must happen on chip, per tile: p_bar is a mean of per-head softmaxes.
        for h in range(num_heads):
            h64 = tl.cast(h, tl.int64)
            query = tl.load(
                q_base + h64 * s_tqh + rows64[:, None] * s_tqt + d[None, :],
                mask=row_in[:, None] & (d[None, :] < head_dim),
                other=0.0,
            )
            key_t = tl.load(
                k_base + (h64 // heads_per_kv) * s_tkh + cols64[None, :] * s_tkt + d[:, None],
                mask=(cols[None, :] < seq_len) & (d[:, None] < head_dim),
                other=0.0,
            )
            lse = tl.load(lse_base + h64 * seq_len + rows, mask=row_in, other=0.0)
            # Disallowed entries may overflow to inf here; they are replaced by 0 below (no inf - inf occurs).
            p_layer += tl.exp2(tl.dot(query, key_t) * scale2 - lse[:, None])
        allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
        valid = allowed & row_ok[:, None]
        p_layer = tl.where(valid, p_layer / num_heads, 0.0)
        p_log2_p = p_layer * tl.log2(tl.where(p_layer > 0, p_layer, 1.0))
        log2_q = tl.load(log2_q_ptr + tile, mask=row_in[:, None], other=0.0)
        tl.store(part + 2 * layer, tl.sum(tl.sum(p_log2_p, 1), 0))
        tl.store(part + 2 * layer + 1, tl.sum(tl.sum(p_layer * log2_q, 1), 0))
        if WRITE_GRAD:
            d_logits = tl.load(d_logits_ptr + tile, mask=row_in[:, None], other=0.0)
            tl.store(d_logits_ptr + tile, d_logits - p_layer / num_layers, mask=row_in[:, None])


@triton.jit
def _dq_dw_kernel(
    q_ptr, k_ptr, w_ptr, d_logits_ptr, dq_ptr, dw_ptr,
    seq_len, chunk_start, inv_rows,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_gb, s_gt,
    BLOCK_T: tl.constexpr, BLOCK_DI: tl.constexpr,
):  # fmt: skip
    pid_t, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = chunk_start + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_in = rows < seq_len
    di = tl.arange(0, BLOCK_DI)
    q_j = tl.load(q_ptr + b * s_qb + rows[:, None] * s_qt + j * s_qj + di[None, :], mask=row_in[:, None], other=0.0)
    w_j = tl.load(w_ptr + b * s_wb + rows * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_T, BLOCK_DI], tl.float32)
    dw = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, chunk_start + (pid_t + 1) * BLOCK_T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        key = tl.load(k_ptr + b * s_kb + cols[:, None] * s_kt + di[None, :], mask=cols[:, None] < seq_len, other=0.0)
        grad = tl.load(
            d_logits_ptr + b * s_gb + (rows[:, None] - chunk_start) * s_gt + cols[None, :],
            mask=row_in[:, None] & (cols[None, :] < seq_len),
            other=0.0,
        )
        scores = tl.dot(q_j, tl.trans(key))
        dw += tl.sum(grad * tl.maximum(scores, 0.0), 1)
        d_scores = tl.where(scores > 0, grad * w_j[:, None], 0.0)
        dq += tl.dot(d_scores.to(key.dtype), key)
    out = rows[:, None] * s_qt + j * s_qj + di[None, :]
    tl.store(dq_ptr + b * s_qb + out, (dq * inv_rows).to(dq_ptr.dtype.element_ty), mask=row_in[:, None])
    tl.store(dw_ptr + b * s_wb + rows * s_wt + j, (dw * inv_rows).to(dw_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _dk_kernel(
    q_ptr, k_ptr, w_ptr, d_logits_ptr, dk_ptr,
    seq_len, chunk_start, chunk_stop, num_idx_heads, inv_rows,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_gb, s_gt, s_dkb, s_dkt,
    BLOCK_T: tl.constexpr, BLOCK_DI: tl.constexpr,
):  # fmt: skip
    pid_s, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cols = pid_s * BLOCK_T + tl.arange(0, BLOCK_T)
    col_in = cols < seq_len
    di = tl.arange(0, BLOCK_DI)
    key = tl.load(k_ptr + b * s_kb + cols[:, None] * s_kt + di[None, :], mask=col_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_T, BLOCK_DI], tl.float32)
    first = pid_s * BLOCK_T  # causal: rows before this key block never see it
    if first < chunk_start:
        first = chunk_start
    for start in range(first, chunk_stop, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        row_in = rows < chunk_stop
        grad_t = tl.load(
            d_logits_ptr + b * s_gb + (rows[None, :] - chunk_start) * s_gt + cols[:, None],
            mask=row_in[None, :] & col_in[:, None],
            other=0.0,
        )
        for j in range(num_idx_heads):
            q_j = tl.load(
                q_ptr + b * s_qb + rows[:, None] * s_qt + j * s_qj + di[None, :], mask=row_in[:, None], other=0.0
            )
            w_j = tl.load(w_ptr + b * s_wb + rows * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
            scores_t = tl.dot(key, tl.trans(q_j))
            d_scores_t = tl.where(scores_t > 0, grad_t * w_j[None, :], 0.0)
            dk += tl.dot(d_scores_t.to(q_j.dtype), q_j)
    out = dk_ptr + b * s_dkb + cols[:, None] * s_dkt + di[None, :]
    tl.store(out, tl.load(out, mask=col_in[:, None]) + dk * inv_rows, mask=col_in[:, None])


def _teacher_tables(teachers: list[TeacherInputs]) -> tuple[list[TeacherInputs], Tensor, Tensor, Tensor]:
    """Pointer tables so one launch reads every served layer without stacking them (stacking copies GiBs)."""
    first = teachers[0]
    strides = (first.query.stride(), first.key.stride())
    if any((t.query.stride(), t.key.stride()) != strides or t.query.stride(-1) != 1 for t in teachers):
        teachers = [TeacherInputs(t.query.contiguous(), t.key.contiguous(), t.scaling) for t in teachers]
    device = first.query.device
    q_table = torch.tensor([t.query.data_ptr() for t in teachers], dtype=torch.int64, device=device)
    k_table = torch.tensor([t.key.data_ptr() for t in teachers], dtype=torch.int64, device=device)
    scales = torch.tensor([float(t.scaling) for t in teachers], dtype=torch.float32, device=device)
    return teachers, q_table, k_table, scales


def _tile_order(first_block: int, stop_row: int, cfg: FusedConfig, device: torch.device) -> Tensor:
    """[n, 2] int32 (row block, col block) causal tiles of rows [first_block*rows, stop_row), L2-grouped.

    Tiles of `tile_group` row blocks are issued column by column, so the programs in flight share a few
    row blocks' queries and a few key blocks' keys, head after head, instead of streaming keys from memory.
    """
    row_blocks = torch.arange(first_block, triton.cdiv(stop_row, cfg.tile_rows), device=device)
    last_col = ((row_blocks + 1) * cfg.tile_rows - 1) // cfg.tile_cols
    tile_rows = row_blocks.repeat_interleave(last_col + 1)
    starts = torch.cumsum(last_col + 1, 0) - (last_col + 1)
    tile_cols = torch.arange(tile_rows.numel(), device=device) - starts.repeat_interleave(last_col + 1)
    group = (tile_rows - first_block) // cfg.tile_group
    order = torch.argsort((group * (int(last_col.max()) + 1) + tile_cols) * row_blocks.numel() + tile_rows)
    return torch.stack([tile_rows[order], tile_cols[order]], dim=1).int().contiguous()


def fused_sums(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    real: Tensor,
    rows_ok: Tensor,
    num_rows: int,
    topk_indices: Tensor | None,
    want_grad: bool,
    cfg: FusedConfig | None = None,
) -> Sums:
    cfg = cfg or CONFIG
    q, k, w = (x.contiguous() for x in (indexer.q, indexer.k, indexer.w))
    batch, seq, num_idx_heads, idx_dim = q.shape
    teachers, q_table, k_table, scales = _teacher_tables(teachers)
    query, key = teachers[0].query, teachers[0].key
    num_layers, num_heads, num_kv_heads, head_dim = len(teachers), query.shape[1], key.shape[1], query.shape[3]
    dtype = _TL_DTYPES[query.dtype]
    block_d = triton.next_power_of_2(head_dim)
    device = q.device
    sparse = topk_indices is not None
    mask_keys = not bool(real.all())
    key_ok = real.to(torch.int8).contiguous()
    row_ok = rows_ok.to(torch.int8).contiguous()
    bits = selection_bitmap(topk_indices, real) if sparse else torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
    flags = {"MASK_KEYS": mask_keys, "SPARSE": sparse}
    index_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1))
    teacher_strides = (query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2))
    mask_strides = (key_ok.stride(0), bits.stride(0), bits.stride(1))

    teacher_lse = torch.empty(num_layers, batch, num_heads, seq, dtype=torch.float32, device=device)
    _teacher_lse_kernel[(triton.cdiv(seq, cfg.lse_rows), batch * num_heads, num_layers)](
        q_table, k_table, scales, teacher_lse, key_ok, bits,
        seq, num_heads, num_heads // num_kv_heads, head_dim, *teacher_strides, *mask_strides,
        DTYPE=dtype, BLOCK_T=cfg.lse_rows, BLOCK_S=cfg.lse_cols, BLOCK_D=block_d, **flags,
        num_warps=cfg.lse_warps, num_stages=cfg.stages,
    )  # fmt: skip
    student_lse = torch.empty(batch, seq, dtype=torch.float32, device=device)
    _student_lse_kernel[(triton.cdiv(seq, cfg.lse_rows), batch)](
        q, k, w, student_lse, key_ok, bits, seq, num_idx_heads, *index_strides, *mask_strides,
        BLOCK_T=cfg.lse_rows, BLOCK_S=cfg.lse_cols, BLOCK_DI=idx_dim, **flags,
        num_warps=cfg.lse_warps, num_stages=cfg.stages,
    )  # fmt: skip

    padded = triton.cdiv(seq, cfg.tile_rows) * cfg.tile_rows
    buffers = 2 if want_grad else 1  # log2 q, and dI when gradients are wanted
    chunk_limit = cfg.scratch_bytes // (4 * buffers * batch * padded) // cfg.tile_rows * cfg.tile_rows
    chunk = max(cfg.tile_rows, min(padded, chunk_limit))
    log2_q_scratch = torch.empty(batch, chunk, padded, dtype=torch.float32, device=device)
    scratch = torch.empty_like(log2_q_scratch) if want_grad else log2_q_scratch
    dq = torch.empty_like(q) if want_grad else None
    dw = torch.empty_like(w) if want_grad else None
    dk = torch.zeros(batch, seq, idx_dim, dtype=torch.float32, device=device) if want_grad else None
    inv_rows = 1.0 / max(num_rows, 1)
    partial_sums = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
    for chunk_start in range(0, seq, chunk):
        chunk_stop = min(chunk_start + chunk, seq)
        tiles = _tile_order(chunk_start // cfg.tile_rows, chunk_stop, cfg, device)
        partial = torch.empty(tiles.shape[0], batch, num_layers, 2, dtype=torch.float32, device=device)
        _kl_tile_kernel[(tiles.shape[0], batch)](
            q, k, w, q_table, k_table, scales, teacher_lse, student_lse,
            key_ok, row_ok, bits, tiles, partial, scratch, log2_q_scratch,
            seq, chunk_start, num_idx_heads, num_layers, num_heads, num_heads // num_kv_heads, head_dim,
            *index_strides, *teacher_strides, *mask_strides, scratch.stride(0), scratch.stride(1),
            DTYPE=dtype, BLOCK_T=cfg.tile_rows, BLOCK_S=cfg.tile_cols, BLOCK_DI=idx_dim, BLOCK_D=block_d,
            WRITE_GRAD=want_grad, **flags, num_warps=cfg.tile_warps, num_stages=cfg.stages,
        )  # fmt: skip
        partial_sums += partial.double().sum(dim=(0, 1))
        if not want_grad:
            continue
        grad_strides = (scratch.stride(0), scratch.stride(1))
        _dq_dw_kernel[(triton.cdiv(chunk_stop - chunk_start, cfg.grad_block), num_idx_heads, batch)](
            q, k, w, scratch, dq, dw, seq, chunk_start, inv_rows, *index_strides, *grad_strides,
            BLOCK_T=cfg.grad_block, BLOCK_DI=idx_dim, num_warps=cfg.grad_warps, num_stages=cfg.stages,
        )  # fmt: skip
        _dk_kernel[(triton.cdiv(chunk_stop, cfg.grad_block), batch)](
            q, k, w, scratch, dk, seq, chunk_start, chunk_stop, num_idx_heads, inv_rows, *index_strides,
            *grad_strides, dk.stride(0), dk.stride(1),
            BLOCK_T=cfg.grad_block, BLOCK_DI=idx_dim, num_warps=cfg.grad_warps, num_stages=cfg.stages,
        )  # fmt: skip
    p_log2_p, p_log2_q = partial_sums[:, 0], partial_sums[:, 1]
    return Sums(
        kl=(p_log2_p - p_log2_q) * LN2,
        entropy=-p_log2_p * LN2,
        num_rows=num_rows,
        dq=dq,
        dk=dk,
        dw=dw,
    )


def fused_multi_layer_kl(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    attention_mask: Tensor | None,
    topk_indices: Tensor | None = None,
) -> KLResult:
    if not fused_supports(indexer, teachers):
        raise ValueError("impl='fused' needs CUDA bf16/fp16 tensors, D_I a power of two <= 256, equal teacher shapes")
    batch, seq = indexer.q.shape[:2]
    real = key_mask(attention_mask, batch, seq, indexer.q.device)
    rows = valid_rows(real, topk_indices)
    # Normalisation: all per-row sums are divided by the number of valid rows (computed once, here).
    num_rows = int(rows.sum())
    detached = [TeacherInputs(t.query.detach(), t.key.detach(), t.scaling) for t in teachers]
    want_grad = wants_grad(indexer)
    plain = IndexerOutputs(indexer.q.detach(), indexer.k.detach(), indexer.w.detach())

    def compute() -> Sums:
        return fused_sums(plain, detached, real, rows, num_rows, topk_indices, want_grad)

    loss, kl_per_layer, entropy = PrecomputedGradKL.apply(indexer.q, indexer.k, indexer.w, compute)
    return KLResult(loss=loss, kl_per_layer=kl_per_layer, teacher_entropy=entropy, num_rows=num_rows)
