"""Fused Triton multi-layer KL (forward and backward) for CUDA; imported lazily, only where triton exists.

Passes (all accumulate in float32; inputs bf16/fp16):
  A. teacher log-sum-exp per (layer, head, row)      grid (row blocks, B*H, G), flash-style: Q stays on chip.
     Skipped when every TeacherInputs carries the attention kernel's `logsumexp`.
  then, for each chunk of R query rows, one program per causal (row block, key block) tile:
  C0. indexer logits (log2 units) to an [R, T] fp32 scratch buffer, and per row their max and sum of exp2 over
      the tile's keys, combined on the host side into the student's log-sum-exp (no separate LSE pass)
  C1. one launch per served layer (or per slab of its heads): the layer's head-averaged p summed over heads on
      chip, log2 q from the stored logits, the KL/entropy partial sums, and dI = q - p / G (first layer) or
      dI -= p / G into a second scratch buffer. Launching layer by layer keeps the programs in flight on the
      same few heads, so their Q and K tiles are shared in L2 instead of re-read from memory.
  D. dq, dw: one program per (row block, indexer head), looping over key blocks
  E. dk:     one program per key block, looping over the chunk's row blocks and indexer heads
No [T, T] tensor is allocated. dI for one row chunk ([R, T], with R chosen so that the scratch buffers stay
within FusedConfig.scratch_bytes) does go through global memory. The dq accumulators of every indexer head for a
row block (BLOCK x H_I x D_I fp32, 1 MiB at 64 rows and H_I=32) cannot stay on chip, so D and E compute dq and
dk from the stored dI instead of C computing them. The gradients are computed in the forward pass (see
chunked.py): the teacher scores, the dominant cost, are then computed once per tile, not again in backward.

Teacher tensors are read through a per-layer pointer table; `tl.multiple_of` restores the 16-byte alignment the
table loses (the host guarantees it), without which Triton issues 2-byte loads that it cannot pipeline.

Sparse variant: the top-k sets become a packed bitmap [B, T, ceil(T/32)] int32 and the same kernels mask with
it, so the sparse loss costs the dense one plus the bit tests. bench/NOTES.md has the figures, and says why
gathering the selected keys would be slower with per-head keys.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from indexcache.kernels.config import FusedConfig
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
LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# The default tiling; a model or benchmark passes its own (`KernelConfig.fused_loss`), nobody reassigns this.
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


def offset_supported(
    teachers: list[TeacherInputs], topk_indices: Tensor | None, query_offset: int, cfg: FusedConfig | None = None
) -> bool:
    """Whether the kernels take rows from `query_offset` on: a whole number of pass-C row blocks, the dense
    variant, and every teacher's LSE from its attention (pass A runs over whole sequences only)."""
    return (
        query_offset % (cfg or CONFIG).tile_rows == 0
        and topk_indices is None
        and all(t.logsumexp is not None for t in teachers)
    )


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
    """I[t, s] = sum_j w[t, j] relu(q[t, j] . k[s]) for one tile; k_t is [D_I, cols]; `rows` index q and w."""
    di = tl.arange(0, BLOCK_DI)
    logits = tl.zeros([rows.shape[0], k_t.shape[1]], dtype=tl.float32)
    for j in range(num_idx_heads):
        q_j = tl.load(q_ptr + rows[:, None] * s_qt + j * s_qj + di[None, :], mask=row_in[:, None], other=0.0)
        w_j = tl.load(w_ptr + rows * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
        logits += w_j[:, None] * tl.maximum(tl.dot(q_j, k_t), 0.0)
    return logits


@triton.jit
def _table_pointer(table, layer, DTYPE: tl.constexpr):
    # The host checks 16-byte alignment (_teacher_tables); the hint lets Triton issue 16-byte pipelined loads.
    return tl.multiple_of(tl.load(table + layer).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _teacher_lse_kernel(
    q_table, k_table, scale_table, lse_ptr, key_ok_ptr, bits_ptr,
    seq_len, num_heads, heads_per_kv,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_okb, s_bitb, s_bitt,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    # Last row blocks first: they see the most keys, so the launch does not end on a few long programs.
    pid_t = tl.cdiv(seq_len, BLOCK_T) - 1 - tl.program_id(0)
    pid_bh, layer = tl.program_id(1), tl.program_id(2)
    # int64 base offsets: one teacher tensor can exceed 2^31 elements at long T (a block's own cannot).
    b, h = (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)
    first_row = pid_t * BLOCK_T
    rows = first_row + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    q_base = _table_pointer(q_table, layer, DTYPE) + b * s_qb + h * s_qh
    k_base = _table_pointer(k_table, layer, DTYPE) + b * s_kb + (h // heads_per_kv) * s_kh
    scale2 = tl.load(scale_table + layer) * 1.4426950408889634
    d_in = d < HEAD_DIM
    # Row offsets inside a block stay int32; the block's first row goes into the int64 base.
    row_offs = tl.arange(0, BLOCK_T)[:, None] * s_qt + d[None, :]
    q_block = q_base + first_row.to(tl.int64) * s_qt
    query = tl.load(q_block + row_offs, mask=(rows[:, None] < seq_len) & d_in[None, :], other=0.0)
    key_offs = tl.arange(0, BLOCK_S)[None, :] * s_kt + d[:, None]
    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_T], tl.float32)
    key_ok, bits = key_ok_ptr + b * s_okb, bits_ptr + b * s_bitb
    # Keys before the block are visible to every row of it: no causal test there.
    for start in range(0, first_row, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        key_t = tl.load(k_base + tl.cast(start, tl.int64) * s_kt + key_offs, mask=d_in[:, None], other=0.0)
        scores = tl.dot(query, key_t) * scale2
        if MASK_KEYS or SPARSE:
            allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, False, MASK_KEYS, SPARSE)
            scores = tl.where(allowed, scores, float("-inf"))
        running_max, running_sum = _lse_update(scores, running_max, running_sum)
    for start in range(first_row, first_row + BLOCK_T, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        k_mask = (cols[None, :] < seq_len) & d_in[:, None]
        key_t = tl.load(k_base + tl.cast(start, tl.int64) * s_kt + key_offs, mask=k_mask, other=0.0)
        scores = tl.dot(query, key_t) * scale2
        allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
        running_max, running_sum = _lse_update(tl.where(allowed, scores, float("-inf")), running_max, running_sum)
    lse_row = lse_ptr + (layer * tl.num_programs(1) + pid_bh).to(tl.int64) * seq_len
    tl.store(lse_row + rows, _finish_lse(running_max, running_sum), mask=rows < seq_len)


@triton.jit
def _student_tile_kernel(
    q_ptr, k_ptr, w_ptr, key_ok_ptr, bits_ptr, tiles_ptr, logits_ptr, stats_ptr,
    seq_len, chunk_start, num_idx_heads, row_base,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_okb, s_bitb, s_bitt, s_gb, s_gt, s_sb, s_st,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr,
    MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    """Pass C0: one tile's indexer logits (log2 units) and, per row, their max and sum of exp2 over its keys.

    The student's log-sum-exp is then the combination of each row's per-tile pairs (`_combine_student_lse`), so
    the logits are computed once here instead of once more in a separate LSE pass; C1 normalises them.
    """
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row_block, col_block = tl.load(tiles_ptr + 2 * pid), tl.load(tiles_ptr + 2 * pid + 1)
    rows = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = col_block * BLOCK_S + tl.arange(0, BLOCK_S)
    row_in = rows < seq_len
    di = tl.arange(0, BLOCK_DI)
    key_ok, bits = key_ok_ptr + b * s_okb, bits_ptr + b * s_bitb
    k_t = tl.load(k_ptr + b * s_kb + cols[None, :] * s_kt + di[:, None], mask=cols[None, :] < seq_len, other=0.0)
    logits = _indexer_logits(
        q_ptr + b * s_qb, w_ptr + b * s_wb, k_t, rows - row_base, row_in, num_idx_heads, s_qt, s_qj, s_wt, BLOCK_DI
    )
    logits = logits * 1.4426950408889634
    tl.store(logits_ptr + b * s_gb + (rows[:, None] - chunk_start) * s_gt + cols[None, :], logits, mask=row_in[:, None])
    allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
    tile_max, tile_sum = _lse_update(
        tl.where(allowed, logits, float("-inf")), tl.full([BLOCK_T], float("-inf"), tl.float32), 0.0
    )
    stats = stats_ptr + b * s_sb + (rows - chunk_start) * s_st + 2 * col_block
    tl.store(stats, tile_max, mask=row_in)
    tl.store(stats + 1, tile_sum, mask=row_in)


@triton.jit
def _teacher_tile_kernel(
    q_table, k_table, scale_table, teacher_lse_ptr, student_lse_ptr, key_ok_ptr, row_ok_ptr, bits_ptr, tiles_ptr,
    partial_ptr, p_ptr, d_logits_ptr, logits_ptr,
    seq_len, chunk_start, layer, first_head, num_slab_heads, num_layers, num_heads, heads_per_kv, row_base, num_rows,
    s_tqb, s_tqh, s_tqt, s_tkb, s_tkh, s_tkt, s_okb, s_bitb, s_bitt, s_gb, s_gt,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr, HEAD_DIM: tl.constexpr, STAGES: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, FIRST_LAYER: tl.constexpr,
    MASK_KEYS: tl.constexpr, SPARSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    """Pass C1: sum over heads [first_head, first_head + num_slab_heads) of one layer's softmax on one tile.

    The head sum must happen on chip, per tile: p_bar is a mean of per-head softmaxes. With head slabs
    (FIRST/LAST false) the running sum goes through p_ptr between launches. The last slab adds the layer's KL and
    entropy partial sums and its -p/G to dI; the first layer's starts dI at q (dI * N = q - p_bar: the 1/N is
    applied to the float32 accumulators of passes D and E, which keeps fp16 off subnormals).
    """
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row_block, col_block = tl.load(tiles_ptr + 2 * pid), tl.load(tiles_ptr + 2 * pid + 1)
    rows = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = col_block * BLOCK_S + tl.arange(0, BLOCK_S)
    row_in, col_in = rows < seq_len, cols < seq_len
    tile = b * s_gb + (rows[:, None] - chunk_start) * s_gt + cols[None, :]
    # int64 bases (a teacher tensor can exceed 2^31 elements at long T); offsets inside a tile stay int32.
    q_base = _table_pointer(q_table, layer, DTYPE) + b * s_tqb + (row_block * BLOCK_T - row_base).to(tl.int64) * s_tqt
    k_base = _table_pointer(k_table, layer, DTYPE) + b * s_tkb + (col_block * BLOCK_S).to(tl.int64) * s_tkt
    tile_rows, tile_cols = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_S)
    scale2 = tl.load(scale_table + layer) * 1.4426950408889634
    lse_base = teacher_lse_ptr + ((layer * tl.num_programs(1) + b) * num_heads).to(tl.int64) * num_rows
    if FIRST:
        p_layer = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
    else:
        p_layer = tl.load(p_ptr + tile, mask=row_in[:, None], other=0.0)
    # One flattened loop over (head, channel chunk): the pipeline runs across head boundaries.
    for h in tl.range(first_head, first_head + num_slab_heads, num_stages=STAGES, flatten=True):
        h64 = tl.cast(h, tl.int64)
        q_head = q_base + h64 * s_tqh
        k_head = k_base + (h64 // heads_per_kv) * s_tkh
        scores = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
        for chunk in range(NUM_D_CHUNKS):
            d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
            q_mask = row_in[:, None] & (d[None, :] < HEAD_DIM)
            query = tl.load(q_head + tile_rows[:, None] * s_tqt + d[None, :], mask=q_mask, other=0.0)
            k_mask = col_in[None, :] & (d[:, None] < HEAD_DIM)
            key_t = tl.load(k_head + tile_cols[None, :] * s_tkt + d[:, None], mask=k_mask, other=0.0)
            scores = tl.dot(query, key_t, scores)
        lse = tl.load(lse_base + h64 * num_rows + rows - row_base, mask=row_in, other=0.0)
        # Disallowed entries may overflow to inf here; they are replaced by 0 below (no inf - inf occurs).
        p_layer += tl.exp2(scores * scale2 - lse[:, None])
    if LAST:
        key_ok, bits = key_ok_ptr + b * s_okb, bits_ptr + b * s_bitb
        row_ok = tl.load(row_ok_ptr + b * s_okb + rows, mask=row_in, other=0) != 0
        allowed = _allowed(rows, cols, seq_len, key_ok, bits, s_bitt, True, MASK_KEYS, SPARSE)
        p_layer = tl.where(allowed & row_ok[:, None], p_layer / num_heads, 0.0)
        part = partial_ptr + ((pid * tl.num_programs(1) + b) * num_layers + layer) * 2
        tl.store(part, tl.sum(tl.sum(p_layer * tl.log2(tl.where(p_layer > 0, p_layer, 1.0)), 1), 0))
        student_lse = tl.load(student_lse_ptr + b * num_rows + rows - row_base, mask=row_in, other=0.0)
        log2_q = tl.load(logits_ptr + tile, mask=row_in[:, None], other=0.0) - student_lse[:, None]
        log2_q = tl.where(allowed, log2_q, 0.0)
        tl.store(part + 1, tl.sum(tl.sum(p_layer * log2_q, 1), 0))
        if WRITE_GRAD:
            if FIRST_LAYER:
                d_logits = tl.where(allowed & row_ok[:, None], tl.exp2(log2_q), 0.0)
            else:
                d_logits = tl.load(d_logits_ptr + tile, mask=row_in[:, None], other=0.0)
            tl.store(d_logits_ptr + tile, d_logits - p_layer / num_layers, mask=row_in[:, None])
    else:
        tl.store(p_ptr + tile, p_layer, mask=row_in[:, None])


@triton.jit
def _dq_dw_kernel(
    q_ptr, k_ptr, w_ptr, d_logits_ptr, dq_ptr, dw_ptr,
    seq_len, chunk_start, inv_rows, row_base,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_gb, s_gt,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr,
):  # fmt: skip
    """Pass D: dq and dw of one indexer head for BLOCK_T rows of the chunk, looping over key blocks of BLOCK_S."""
    # Indexer heads vary fastest across programs: the H_I programs of one row block run together and read its dI
    # rows from L2 (with row blocks fastest, every head re-read the whole [R, T] chunk from memory).
    j, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = chunk_start + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_in = rows < seq_len
    local = rows - row_base  # q, w, dq and dw hold the rows from row_base on
    di = tl.arange(0, BLOCK_DI)
    q_j = tl.load(q_ptr + b * s_qb + local[:, None] * s_qt + j * s_qj + di[None, :], mask=row_in[:, None], other=0.0)
    w_j = tl.load(w_ptr + b * s_wb + local * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_T, BLOCK_DI], tl.float32)
    dw = tl.zeros([BLOCK_T], tl.float32)
    # Keys up to the block's last row; pass C wrote dI there (zeros above the diagonal of its own tiles, which
    # BLOCK_T and BLOCK_S divide).
    for start in range(0, chunk_start + (pid_t + 1) * BLOCK_T, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
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
    out = local[:, None] * s_qt + j * s_qj + di[None, :]
    tl.store(dq_ptr + b * s_qb + out, (dq * inv_rows).to(dq_ptr.dtype.element_ty), mask=row_in[:, None])
    tl.store(dw_ptr + b * s_wb + local * s_wt + j, (dw * inv_rows).to(dw_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _dk_kernel(
    q_ptr, k_ptr, w_ptr, d_logits_ptr, dk_ptr,
    seq_len, chunk_start, chunk_stop, num_idx_heads, inv_rows, row_base,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_gb, s_gt, s_dkb, s_dkt,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr,
):  # fmt: skip
    """Pass E: dk of BLOCK_S keys, looping over the chunk's rows in steps of BLOCK_T and over indexer heads."""
    pid_s, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    col_in = cols < seq_len
    di = tl.arange(0, BLOCK_DI)
    key = tl.load(k_ptr + b * s_kb + cols[:, None] * s_kt + di[None, :], mask=col_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_S, BLOCK_DI], tl.float32)
    # Causal: rows before this key block never see it (the row step holding its first key is where to start).
    first = (pid_s * BLOCK_S) // BLOCK_T * BLOCK_T
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
        local = rows - row_base  # q and w hold the rows from row_base on
        for j in range(num_idx_heads):
            q_j = tl.load(
                q_ptr + b * s_qb + local[:, None] * s_qt + j * s_qj + di[None, :], mask=row_in[:, None], other=0.0
            )
            w_j = tl.load(w_ptr + b * s_wb + local * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
            scores_t = tl.dot(key, tl.trans(q_j))
            d_scores_t = tl.where(scores_t > 0, grad_t * w_j[None, :], 0.0)
            dk += tl.dot(d_scores_t.to(q_j.dtype), q_j)
    out = dk_ptr + b * s_dkb + cols[:, None] * s_dkt + di[None, :]
    tl.store(out, tl.load(out, mask=col_in[:, None]) + dk * inv_rows, mask=col_in[:, None])


def _aligned(x: Tensor) -> bool:
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0


def _teacher_tables(teachers: list[TeacherInputs]) -> tuple[list[TeacherInputs], Tensor, Tensor, Tensor]:
    """Pointer tables so one launch reads every served layer without stacking them (stacking copies GiBs).

    The kernels read teachers with 16-byte loads from the table's addresses, so those must be 16-byte aligned,
    with unit stride in D and the same strides in every layer; otherwise each tensor is copied once.
    """
    first = teachers[0]
    strides = (first.query.stride(), first.key.stride())
    if any(
        (t.query.stride(), t.key.stride()) != strides or not (_aligned(t.query) and _aligned(t.key)) for t in teachers
    ):
        teachers = [
            TeacherInputs(
                torch.empty_like(t.query, memory_format=torch.contiguous_format).copy_(t.query),
                torch.empty_like(t.key, memory_format=torch.contiguous_format).copy_(t.key),
                t.scaling,
                t.logsumexp,
            )
            for t in teachers
        ]
    device = first.query.device
    q_table = _to_device(torch.tensor([t.query.data_ptr() for t in teachers], dtype=torch.int64), device)
    k_table = _to_device(torch.tensor([t.key.data_ptr() for t in teachers], dtype=torch.int64), device)
    scales = _to_device(torch.tensor([float(t.scaling) for t in teachers], dtype=torch.float32), device)
    return teachers, q_table, k_table, scales


def _tile_order(first_block: int, stop_row: int, tile_rows: int, tile_cols: int, tile_group: int) -> Tensor:
    """[n, 2] int32 (row block, col block) causal tiles of rows [first_block*rows, stop_row), L2-grouped (CPU).

    Tiles of `tile_group` row blocks are issued column by column, so the programs in flight share a few
    row blocks' queries and a few key blocks' keys, head after head, instead of streaming keys from memory.
    Built on the host: the caller copies every chunk's order to the GPU at once, without waiting for it.
    """
    row_blocks = torch.arange(first_block, triton.cdiv(stop_row, tile_rows))
    counts = ((row_blocks + 1) * tile_rows - 1) // tile_cols + 1  # key blocks each row block sees
    row_of_tile = row_blocks.repeat_interleave(counts)
    col_of_tile = torch.arange(row_of_tile.numel()) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    group = (row_of_tile - first_block) // tile_group
    order = torch.argsort((group * int(counts.max()) + col_of_tile) * row_blocks.numel() + row_of_tile)
    return torch.stack([row_of_tile[order], col_of_tile[order]], dim=1).int()


@functools.lru_cache(maxsize=32)
def _chunk_tiles(
    seq: int, chunk: int, tile_rows: int, tile_cols: int, tile_group: int, device: torch.device, first_row: int = 0
) -> tuple[Tensor, ...]:
    """Every row chunk's tile order on `device` (rows first_row .. seq - 1), cached: a training run repeats the same
    few shapes, and building the orders on the host (tens of ms at 32K) would leave the GPU idle when no
    teacher-LSE pass hides it."""
    orders = [
        _tile_order(start // tile_rows, min(start + chunk, seq), tile_rows, tile_cols, tile_group)
        for start in range(first_row, seq, chunk)
    ]
    return _to_device(torch.cat(orders), device).split([len(order) for order in orders])


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor without stalling the stream (a pageable copy would wait for queued kernels)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _combine_student_lse(stats: Tensor) -> Tensor:
    """[B, R] log2-sum-exp2 of each row's logits from its per-key-block (max, sum of exp2) pairs [B, R, n, 2].

    A row with no visible key gets 0 (as `_finish_lse` gives): it carries no loss and exp2(-inf - 0) = 0.
    """
    block_max, block_sum = stats.unbind(-1)
    row_max = block_max.amax(dim=-1)
    safe = torch.where(torch.isinf(row_max), 0.0, row_max)  # -inf only for a row with no key at all
    total = (block_sum * torch.exp2(block_max - safe[..., None])).sum(dim=-1)
    return torch.where(total > 0, safe + torch.log2(total), 0.0)


def _teacher_lse(
    teachers: list[TeacherInputs], tables: tuple[Tensor, Tensor, Tensor], key_ok: Tensor, bits: Tensor,
    flags: dict, cfg: FusedConfig,
) -> Tensor:  # fmt: skip
    """[G, B, H, T] float32 log2-sum-exp2 of each head's scaled scores: the teachers' own, or pass A's."""
    query, key = teachers[0].query, teachers[0].key
    batch, num_heads, seq, head_dim = query.shape
    if all(t.logsumexp is not None for t in teachers):
        # The attention kernel's natural-log LSE; log2 units are what the kernels' exp2 takes.
        return torch.stack([t.logsumexp.float() for t in teachers]) * LOG2E
    q_table, k_table, scales = tables
    lse = torch.empty(len(teachers), batch, num_heads, seq, dtype=torch.float32, device=query.device)
    _teacher_lse_kernel[(triton.cdiv(seq, cfg.lse_rows), batch * num_heads, len(teachers))](
        q_table, k_table, scales, lse, key_ok, bits,
        seq, num_heads, num_heads // key.shape[1], *query.stride()[:3], *key.stride()[:3],
        key_ok.stride(0), bits.stride(0), bits.stride(1),
        DTYPE=_TL_DTYPES[query.dtype], BLOCK_T=cfg.lse_rows, BLOCK_S=cfg.lse_cols,
        BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim, **flags,
        num_warps=cfg.lse_warps, num_stages=cfg.lse_stages,
    )  # fmt: skip
    return lse


def fused_sums(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    real: Tensor,
    rows_ok: Tensor,
    num_rows: int,
    topk_indices: Tensor | None,
    want_grad: bool,
    mask_keys: bool,
    cfg: FusedConfig | None = None,
    query_offset: int = 0,
) -> Sums:
    """The loss's row sums and gradients; `mask_keys`: some key in `real` is padding (the kernels then test it).

    `query_offset` > 0 (context parallelism, `offset_supported`): the query-side tensors hold the rows from that
    global position on, the key-side ones (indexer k, teacher keys, `real`) every key before and among them. The
    kernels then index keys and causality by global position and the query side by `row - query_offset`.
    """
    cfg = cfg or CONFIG
    for size in (cfg.dq_rows, cfg.dq_cols, cfg.dk_rows, cfg.dk_cols):
        if min(cfg.tile_rows, cfg.tile_cols) % size:
            raise ValueError(f"FusedConfig: pass D/E block {size} must divide the pass-C tile {cfg.tile_rows}")
    q, k, w = (x.contiguous() for x in (indexer.q, indexer.k, indexer.w))
    batch, local_rows, num_idx_heads, idx_dim = q.shape
    seq = query_offset + local_rows  # keys, and the global position after the last row
    teachers, q_table, k_table, scales = _teacher_tables(teachers)
    query, key = teachers[0].query, teachers[0].key
    num_layers, num_heads, num_kv_heads, head_dim = len(teachers), query.shape[1], key.shape[1], query.shape[3]
    device = q.device
    sparse = topk_indices is not None
    key_ok = real.to(torch.int8).contiguous()
    # Rows by global position (none before the offset), so row and key masks share one layout.
    row_ok = torch.zeros(batch, seq, dtype=torch.int8, device=device)
    row_ok[:, query_offset:] = rows_ok.to(torch.int8)
    bits = selection_bitmap(topk_indices, real) if sparse else torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
    flags = {"MASK_KEYS": mask_keys, "SPARSE": sparse}
    index_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1))
    teacher_strides = (*query.stride()[:3], *key.stride()[:3])
    mask_strides = (key_ok.stride(0), bits.stride(0), bits.stride(1))

    if query_offset and (query_offset % cfg.tile_rows or not all(t.logsumexp is not None for t in teachers)):
        raise ValueError(
            f"the fused loss takes query_offset={query_offset} only as a multiple of {cfg.tile_rows} rows, with "
            "the teachers' attention LSE"
        )
    teacher_lse = _teacher_lse(teachers, (q_table, k_table, scales), key_ok, bits, flags, cfg)
    student_lse = torch.empty(batch, local_rows, dtype=torch.float32, device=device)

    slab = cfg.heads_per_launch if 0 < cfg.heads_per_launch < num_heads else num_heads
    depth = min(cfg.tile_depth, triton.next_power_of_2(head_dim))
    padded = triton.cdiv(seq, cfg.tile_rows) * cfg.tile_rows
    buffers = 1 + want_grad + (slab < num_heads)  # logits; dI when gradients are wanted; p between head slabs
    chunk_limit = cfg.scratch_bytes // (4 * buffers * batch * padded) // cfg.tile_rows * cfg.tile_rows
    chunk = max(cfg.tile_rows, min(padded, chunk_limit))
    logits_scratch = torch.empty(batch, chunk, padded, dtype=torch.float32, device=device)
    scratch = torch.empty_like(logits_scratch) if want_grad else logits_scratch
    p_scratch = torch.empty_like(logits_scratch) if slab < num_heads else logits_scratch
    # Per row and key block of the chunk: max and sum of exp2 of the student logits (pass C0's LSE partials).
    stats = torch.empty(batch, chunk, triton.cdiv(padded, cfg.tile_cols), 2, dtype=torch.float32, device=device)
    dq = torch.empty_like(q) if want_grad else None
    dw = torch.empty_like(w) if want_grad else None
    dk = torch.zeros(batch, seq, idx_dim, dtype=torch.float32, device=device) if want_grad else None
    inv_rows = 1.0 / max(num_rows, 1)
    grad_strides = (scratch.stride(0), scratch.stride(1))
    partial_sums = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
    chunks = [(start, min(start + chunk, seq)) for start in range(query_offset, seq, chunk)]
    all_tiles = _chunk_tiles(seq, chunk, cfg.tile_rows, cfg.tile_cols, cfg.tile_group, device, query_offset)
    for (chunk_start, chunk_stop), tiles in zip(chunks, all_tiles, strict=True):
        grid = (tiles.shape[0], batch)
        stats[..., 0].fill_(float("-inf"))  # key blocks past a row block's diagonal have no tile: no keys
        stats[..., 1].zero_()
        _student_tile_kernel[grid](
            q, k, w, key_ok, bits, tiles, logits_scratch, stats,
            seq, chunk_start, num_idx_heads, query_offset, *index_strides, *mask_strides, *grad_strides,
            stats.stride(0),
            stats.stride(1), BLOCK_T=cfg.tile_rows, BLOCK_S=cfg.tile_cols, BLOCK_DI=idx_dim, **flags,
            num_warps=cfg.tile_warps, num_stages=cfg.stages,
        )  # fmt: skip
        student_lse[:, chunk_start - query_offset : chunk_stop - query_offset] = _combine_student_lse(
            stats[:, : chunk_stop - chunk_start]
        )
        partial = torch.empty(tiles.shape[0], batch, num_layers, 2, dtype=torch.float32, device=device)
        for layer in range(num_layers):
            for first_head in range(0, num_heads, slab):
                _teacher_tile_kernel[grid](
                    q_table, k_table, scales, teacher_lse, student_lse, key_ok, row_ok, bits, tiles,
                    partial, p_scratch, scratch, logits_scratch,
                    seq, chunk_start, layer, first_head, min(slab, num_heads - first_head), num_layers, num_heads,
                    num_heads // num_kv_heads, query_offset, local_rows, *teacher_strides, *mask_strides,
                    *grad_strides,
                    DTYPE=_TL_DTYPES[query.dtype], BLOCK_T=cfg.tile_rows, BLOCK_S=cfg.tile_cols, BLOCK_D=depth,
                    NUM_D_CHUNKS=triton.cdiv(head_dim, depth), HEAD_DIM=head_dim, STAGES=cfg.tile_stages,
                    FIRST=first_head == 0, LAST=first_head + slab >= num_heads, FIRST_LAYER=layer == 0,
                    WRITE_GRAD=want_grad, **flags,
                    num_warps=cfg.tile_warps, num_stages=cfg.tile_stages,
                )  # fmt: skip
        partial_sums += partial.double().sum(dim=(0, 1))
        if not want_grad:
            continue
        _dq_dw_kernel[(num_idx_heads, triton.cdiv(chunk_stop - chunk_start, cfg.dq_rows), batch)](
            q, k, w, scratch, dq, dw, seq, chunk_start, inv_rows, query_offset, *index_strides, *grad_strides,
            BLOCK_T=cfg.dq_rows, BLOCK_S=cfg.dq_cols, BLOCK_DI=idx_dim, num_warps=cfg.dq_warps,
            num_stages=cfg.stages,
        )  # fmt: skip
        _dk_kernel[(triton.cdiv(chunk_stop, cfg.dk_cols), batch)](
            q, k, w, scratch, dk, seq, chunk_start, chunk_stop, num_idx_heads, inv_rows, query_offset,
            *index_strides,
            *grad_strides, dk.stride(0), dk.stride(1),
            BLOCK_T=cfg.dk_rows, BLOCK_S=cfg.dk_cols, BLOCK_DI=idx_dim, num_warps=cfg.dk_warps,
            num_stages=cfg.stages,
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
    num_rows: int | None = None,
    query_offset: int = 0,
    cfg: FusedConfig | None = None,
) -> KLResult:
    """The fused group KL; `num_rows` replaces the valid-row count as the normaliser, `query_offset` > 0 takes
    rows from that global position on (`offset_supported`; see `multi_layer_kl`); `cfg`: the tiling (default
    `CONFIG`)."""
    cfg = cfg or CONFIG
    if not fused_supports(indexer, teachers):
        raise ValueError("impl='fused' needs CUDA bf16/fp16 tensors, D_I a power of two <= 256, equal teacher shapes")
    if query_offset and not offset_supported(teachers, topk_indices, query_offset, cfg):
        raise ValueError(
            f"impl='fused' takes query_offset={query_offset} only as a multiple of {cfg.tile_rows} rows, dense, "
            "with every teacher's attention LSE: use impl='chunked' or 'auto'"
        )
    batch, seq = indexer.q.shape[:2]
    real = key_mask(attention_mask, batch, indexer.k.shape[1], indexer.q.device)
    rows = valid_rows(real, topk_indices, query_offset)
    # Normalisation: all per-row sums are divided by the number of valid rows (computed once, here). Without
    # padding or top-k every row counts: known on the host, so the training step does not wait on the GPU here.
    if num_rows is None:
        num_rows = batch * seq if attention_mask is None and topk_indices is None else int(rows.sum())
    mask_keys = attention_mask is not None and not bool(real.all())
    detached = [TeacherInputs(t.query.detach(), t.key.detach(), t.scaling, t.logsumexp) for t in teachers]
    want_grad = wants_grad(indexer)
    plain = IndexerOutputs(indexer.q.detach(), indexer.k.detach(), indexer.w.detach())

    def compute() -> Sums:
        return fused_sums(
            plain, detached, real, rows, num_rows, topk_indices, want_grad, mask_keys, cfg, query_offset=query_offset
        )

    loss, kl_per_layer, entropy = PrecomputedGradKL.apply(indexer.q, indexer.k, indexer.w, compute)
    return KLResult(loss=loss, kl_per_layer=kl_per_layer, teacher_entropy=entropy, num_rows=num_rows)
