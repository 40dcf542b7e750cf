"""Triton kernel of the indexer's masked scores for one chunk of query rows (the top-k's input); CUDA only.

    I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])    for s <= t and s a real key, else -inf

`indexer.select_topk` computes this per row chunk and takes the top-k. The PyTorch scorer (`indexer.index_scores`)
adds the heads one at a time, writing and re-reading a [B, c, S] float32 buffer per head (about 1 GB of traffic per
head and 1024-row chunk at 32K); this kernel keeps a tile's sum on chip over the heads and writes the chunk once.
Products are bf16/fp16 on the tensor cores with float32 accumulation, so scores differ from the float32 scorer
by round-off (near-ties may then order differently); tests/test_sparse_gpu.py bounds the difference.

`triton_index_candidates` is the same tile code for the top-k's candidate filter (`KernelConfig.topk_filter`): it
stores only the keys scoring at or above each row's threshold, so the [c, S] chunk is never written.
`indexer.index_candidates` is its PyTorch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from indexcache.kernels.config import ScorerTiles


def triton_index_supports(q: Tensor, k: Tensor) -> bool:
    dim = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.dtype == q.dtype
        and 16 <= dim <= 256
        and dim & (dim - 1) == 0
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


@triton.jit
def _tile_scores(
    q_ptr, k_ptr, w_ptr, real_ptr, b, rows, row_in, cols, num_keys, num_heads, query_offset, key_step,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_rb,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, MASK_KEYS: tl.constexpr,
):  # fmt: skip
    """A [BLOCK_T, BLOCK_S] tile's scores (float32) and which of them are visible. Column c is key
    c * key_step (k holds every key_step-th key: the candidate filter's subset; 1 for every key)."""
    d = tl.arange(0, D)
    k_t = tl.load(
        k_ptr + b * s_kb + cols[None, :].to(tl.int64) * s_kt + d[:, None], mask=cols[None, :] < num_keys, other=0.0
    )
    acc = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
    # q and w hold the rows from global position query_offset on (context parallelism); k every key.
    q_index = (rows - query_offset).to(tl.int64)
    q_rows = q_ptr + b * s_qb + q_index[:, None] * s_qt + d[None, :]
    for j in range(num_heads):
        q_j = tl.load(q_rows + j * s_qj, mask=row_in[:, None], other=0.0)
        w_j = tl.load(w_ptr + b * s_wb + q_index * s_wt + j, mask=row_in, other=0.0).to(tl.float32)
        acc += w_j[:, None] * tl.maximum(tl.dot(q_j, k_t), 0.0)
    positions = cols * key_step
    visible = (positions[None, :] <= rows[:, None]) & (cols[None, :] < num_keys)
    if MASK_KEYS:
        real = tl.load(real_ptr + b * s_rb + positions, mask=cols < num_keys, other=0)
        visible = visible & (real != 0)[None, :]
    return acc, visible


@triton.jit
def _index_scores_kernel(
    q_ptr, k_ptr, w_ptr, real_ptr, out_ptr,
    row_start, row_stop, num_keys, num_heads, query_offset, key_step,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_rb, s_ob, s_ot,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, MASK_KEYS: tl.constexpr,
):  # fmt: skip
    pid_s, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    local = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = row_start + local
    cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    out_ptrs = out_ptr + b * s_ob + local[:, None].to(tl.int64) * s_ot + cols[None, :]
    row_in = rows < row_stop
    store_mask = row_in[:, None] & (cols[None, :] < num_keys)
    if pid_s * BLOCK_S * key_step > row_start + pid_t * BLOCK_T + BLOCK_T - 1:
        # Wholly above the diagonal: no row of the tile sees these keys.
        tl.store(out_ptrs, tl.full([BLOCK_T, BLOCK_S], float("-inf"), tl.float32), mask=store_mask)
    else:
        acc, visible = _tile_scores(
            q_ptr, k_ptr, w_ptr, real_ptr, b, rows, row_in, cols, num_keys, num_heads, query_offset, key_step,
            s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_rb, D, BLOCK_T, BLOCK_S, MASK_KEYS,
        )  # fmt: skip
        tl.store(out_ptrs, tl.where(visible, acc, float("-inf")), mask=store_mask)


@triton.jit
def _index_candidates_kernel(
    q_ptr, k_ptr, w_ptr, real_ptr, tau_ptr, value_ptr, key_ptr, count_ptr,
    row_start, row_stop, num_keys, num_heads, query_offset, capacity,
    s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_rb, s_tb, s_vb, s_vt, s_cb,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, MASK_KEYS: tl.constexpr,
):  # fmt: skip
    """The scorer's tile, of which only visible keys scoring >= the row's threshold are kept: each row's count is
    claimed with one atomic add per tile row, and its keys stored from there, in tile order (the buffer's order is
    arbitrary: the caller orders by score, then key). A row counts past `capacity` but stores nothing beyond it."""
    pid_s, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if pid_s * BLOCK_S <= row_start + pid_t * BLOCK_T + BLOCK_T - 1:  # tiles wholly above the diagonal keep nothing
        local = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = row_start + local
        cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        row_in = rows < row_stop
        acc, visible = _tile_scores(
            q_ptr, k_ptr, w_ptr, real_ptr, b, rows, row_in, cols, num_keys, num_heads, query_offset, 1,
            s_qb, s_qt, s_qj, s_kb, s_kt, s_wb, s_wt, s_rb, D, BLOCK_T, BLOCK_S, MASK_KEYS,
        )  # fmt: skip
        tau = tl.load(tau_ptr + b * s_tb + local, mask=row_in, other=float("inf"))
        keep = visible & (acc >= tau[:, None]) & row_in[:, None]
        kept = keep.to(tl.int32)
        counts = tl.sum(kept, 1)
        base = tl.atomic_add(count_ptr + b * s_cb + local, counts, mask=row_in & (counts > 0), sem="relaxed")
        slot = base[:, None] + tl.cumsum(kept, 1) - 1
        store = keep & (slot < capacity)
        offsets = b * s_vb + local[:, None].to(tl.int64) * s_vt + slot
        tl.store(value_ptr + offsets, acc, mask=store)
        tl.store(key_ptr + offsets, cols[None, :] + tl.zeros([BLOCK_T, BLOCK_S], tl.int32), mask=store)


def triton_index_scores(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    real: Tensor | None,
    start: int,
    stop: int,
    query_offset: int = 0,
    tiles: ScorerTiles | None = None,
    key_step: int = 1,
) -> Tensor:
    """[B, stop - start, query_offset + stop] float32 masked indexer scores of local query rows [start, stop) at
    global positions query_offset + t (see the module doc).

    `key_step` > 1: only every key_step-th key (keys 0, key_step, ...: [B, rows, ceil(keys / key_step)]), the
    candidate filter's subset, each the same value as in the full scores' column.
    """
    tiles = tiles or ScorerTiles()
    batch, _, num_heads, dim = q.shape
    rows = stop - start
    row_start, row_stop = query_offset + start, query_offset + stop
    keys = k[:, :row_stop:key_step]
    num_cols = keys.shape[1]
    out = torch.empty(batch, rows, num_cols, dtype=torch.float32, device=q.device)
    real_arg = real.to(torch.int8).contiguous() if real is not None else out  # read only with MASK_KEYS
    grid = (triton.cdiv(num_cols, tiles.keys), triton.cdiv(rows, tiles.rows), batch)
    _index_scores_kernel[grid](
        q, keys, w, real_arg, out,
        row_start, row_stop, num_cols, num_heads, query_offset, key_step,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), w.stride(0), w.stride(1),
        real_arg.stride(0), out.stride(0), out.stride(1),
        D=dim, BLOCK_T=tiles.rows, BLOCK_S=tiles.keys, MASK_KEYS=real is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out


def triton_index_candidates(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    real: Tensor | None,
    start: int,
    stop: int,
    tau: Tensor,
    capacity: int,
    query_offset: int = 0,
    tiles: ScorerTiles | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The visible keys of rows [start, stop) whose score is >= the row's `tau` [B, rows] float32: values
    [B, rows, capacity] float32 (-inf in unused slots), their key positions [B, rows, capacity] int32 (in no
    particular order; 0 in unused slots) and each row's count [B, rows] int32, which exceeds `capacity` when the
    row's keys did not fit (those beyond it are not stored). The scores are the same values as
    `triton_index_scores`' (the same tile code)."""
    tiles = tiles or ScorerTiles()
    batch, _, num_heads, dim = q.shape
    rows = stop - start
    row_start, row_stop = query_offset + start, query_offset + stop
    values = torch.full((batch, rows, capacity), float("-inf"), dtype=torch.float32, device=q.device)
    keys = torch.zeros(batch, rows, capacity, dtype=torch.int32, device=q.device)
    counts = torch.zeros(batch, rows, dtype=torch.int32, device=q.device)
    tau = tau.float().contiguous()
    real_arg = real.to(torch.int8).contiguous() if real is not None else counts  # read only with MASK_KEYS
    grid = (triton.cdiv(row_stop, tiles.keys), triton.cdiv(rows, tiles.rows), batch)
    _index_candidates_kernel[grid](
        q, k, w, real_arg, tau, values, keys, counts,
        row_start, row_stop, row_stop, num_heads, query_offset, capacity,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        real_arg.stride(0), tau.stride(0), values.stride(0), values.stride(1), counts.stride(0),
        D=dim, BLOCK_T=tiles.rows, BLOCK_S=tiles.keys, MASK_KEYS=real is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return values, keys, counts
