"""Triton kernel of the indexer's masked scores for one chunk of query rows (the top-k's input); CUDA only.

    I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])    for s <= t and s a real key, else -inf

`indexer.select_topk` computes this per row chunk and takes the top-k. The PyTorch scorer (`indexer.index_scores`)
adds the heads one at a time, writing and re-reading a [B, c, S] float32 buffer per head (about 1 GB of traffic per
head and 1024-row chunk at 32K); this kernel keeps a tile's sum on chip over the heads and writes the chunk once.
Products are bf16/fp16 on the tensor cores with float32 accumulation, so scores differ from the float32 scorer
by round-off (near-ties may then order differently); tests/test_sparse_gpu.py bounds the difference.
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
def _index_scores_kernel(
    q_ptr, k_ptr, w_ptr, real_ptr, out_ptr,
    row_start, row_stop, num_keys, num_heads, query_offset,
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
    if pid_s * BLOCK_S > row_start + pid_t * BLOCK_T + BLOCK_T - 1:
        # Wholly above the diagonal: no row of the tile sees these keys.
        tl.store(out_ptrs, tl.full([BLOCK_T, BLOCK_S], float("-inf"), tl.float32), mask=store_mask)
    else:
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
        visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < num_keys)
        if MASK_KEYS:
            visible = visible & (tl.load(real_ptr + b * s_rb + cols, mask=cols < num_keys, other=0) != 0)[None, :]
        tl.store(out_ptrs, tl.where(visible, acc, float("-inf")), mask=store_mask)


def triton_index_scores(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    real: Tensor | None,
    start: int,
    stop: int,
    query_offset: int = 0,
    tiles: ScorerTiles | None = None,
) -> Tensor:
    """[B, stop - start, query_offset + stop] float32 masked indexer scores of local query rows [start, stop) at
    global positions query_offset + t (see the module doc)."""
    tiles = tiles or ScorerTiles()
    batch, _, num_heads, dim = q.shape
    rows = stop - start
    row_start, row_stop = query_offset + start, query_offset + stop
    out = torch.empty(batch, rows, row_stop, dtype=torch.float32, device=q.device)
    real_arg = real.to(torch.int8).contiguous() if real is not None else out  # read only with MASK_KEYS
    grid = (triton.cdiv(row_stop, tiles.keys), triton.cdiv(rows, tiles.rows), batch)
    _index_scores_kernel[grid](
        q, k, w, real_arg, out,
        row_start, row_stop, row_stop, num_heads, query_offset,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        real_arg.stride(0), out.stride(0), out.stride(1),
        D=dim, BLOCK_T=tiles.rows, BLOCK_S=tiles.keys, MASK_KEYS=real is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out
