"""Gather-based sparse attention: each query row attends only to the keys its top-k slots name.

    out[t, h] = sum_k softmax_k(scaling * query[t, h] . key[idx[t, k], g(h)]) * value[idx[t, k], g(h)]
    lse[t, h] = log sum_k exp(scaling * query[t, h] . key[idx[t, k], g(h)])        (natural log, float32)

over the slots k with idx[t, k] >= 0, g(h) = h // (H / H_kv) the KV head of query head h (GQA; MQA when H_kv = 1).
A row with no slot left gets output 0 and LSE -inf (such rows carry no loss, and no real row reads them).

Layouts are token-major: query [B, T, H, D], key [B, T, H_kv, D], value [B, T, H_kv, D_v], indices [B, T, K]. The
MLA families call this in the weight-absorbed form (docs/DESIGN.md section 5): one KV head whose key is the 576-wide
latent (kv_lora 512 + rope 64) and whose value is the key's first 512 columns (a view, not a copy).

Two implementations of the same maths:
- the reference: query rows in chunks, the chunk's K keys gathered, scores [B, c, H, K]; exact in the input dtype's
  accumulation type (float64 stays float64). Memory O(c * K * (H_kv * D + H)), never [T, T]. Its backward recomputes
  each chunk (nothing of size [T, K, D] is kept), so the whole function is also the CPU and fallback path;
- `triton_sparse.py`: the forward, the teacher pass and the backward as Triton kernels on CUDA (one program per
  query row and block of heads, keys gathered straight from global memory / L2). The backward recomputes each
  row's probabilities from the forward's LSE, writes dQ and adds dK, dV into float32 buffers with atomics; in the
  latent form the value's gradient goes straight into the key's first 512 columns (one buffer, one atomic add).
  It runs whenever the forward did; the reference's backward is the exact slow path everywhere else.
The teacher probabilities (`sparse_attention_probs`) are a second pass over the same gathered keys, normalised by
the forward's LSE, so they equal the attention's own probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from indexcache.losses.interface import compute_dtype, visible_slots

__all__ = ["sparse_attention", "sparse_attention_probs", "visible_slots"]

IMPLEMENTATIONS = ("auto", "reference", "triton")
# Scratch per query-row chunk of the reference (gathered keys and values plus a few [c, H, K] score buffers).
CHUNK_BYTES = 512 * 2**20


def _rows_per_chunk(query: Tensor, key: Tensor, value: Tensor, num_slots: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} is invalid: use a positive number of query rows")
        return chunk_size
    batch, _, heads, _ = query.shape
    per_row = num_slots * (key.shape[2] * (key.shape[3] + value.shape[3]) * key.element_size() + 4 * heads * 4)
    return max(1, CHUNK_BYTES // max(batch * per_row, 1))


def _gather_rows(tensor_BTX: Tensor, slots: Tensor) -> Tensor:
    """tensor [B, T, ...] gathered at slots [B, c, K] (-1 read as 0; the caller masks those) -> [B, c, K, ...]."""
    batch = tensor_BTX.shape[0]
    rows = torch.arange(batch, device=slots.device)[:, None]
    flat = slots.clamp_min(0).reshape(batch, -1)
    return tensor_BTX[rows, flat].view(*slots.shape, *tensor_BTX.shape[2:])


def _chunk_probs(
    query: Tensor, keys: Tensor, slots: Tensor, scaling: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-head probabilities [B, c, H, K] and LSE [B, c, H] of one chunk (query [B, c, H, D], keys [B, c, K, H_kv, D]).

    Rows without a slot get probabilities 0 and LSE -inf, not NaN.
    """
    batch, rows, heads, dim = query.shape
    kv_heads = keys.shape[3]
    grouped = query.to(dtype).view(batch, rows, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bcgnd,bckgd->bcgnk", grouped, keys.to(dtype)).reshape(batch, rows, heads, -1)
    scores = scores.mul_(scaling).masked_fill_((slots < 0)[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return scores.sub_(finite_lse[..., None]).exp_(), lse


def _reference_forward(
    query: Tensor, key: Tensor, value: Tensor, slots: Tensor, scaling: float, rows_per_chunk: int
) -> tuple[Tensor, Tensor]:
    batch, seq, heads, _ = query.shape
    kv_heads, value_dim = value.shape[2], value.shape[3]
    dtype = compute_dtype(query.dtype)
    out = query.new_empty(batch, seq, heads, value_dim)
    lse = torch.empty(
        batch, seq, heads, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=query.device
    )
    for start in range(0, seq, rows_per_chunk):
        stop = min(start + rows_per_chunk, seq)
        chunk_slots = slots[:, start:stop]
        probs, chunk_lse = _chunk_probs(
            query[:, start:stop], _gather_rows(key, chunk_slots), chunk_slots, scaling, dtype
        )
        values = _gather_rows(value, chunk_slots).to(dtype)
        grouped = probs.view(batch, stop - start, kv_heads, heads // kv_heads, -1)
        out[:, start:stop] = torch.einsum("bcgnk,bckgv->bcgnv", grouped, values).reshape(batch, -1, heads, value_dim)
        lse[:, start:stop] = chunk_lse
    return out, lse


def _reference_backward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    slots: Tensor,
    out: Tensor,
    d_out: Tensor,
    scaling: float,
    rows_per_chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients by recomputing each chunk's probabilities: dS = P * (dP - rowsum(dO * O)), keys scattered back."""
    batch, seq, heads, dim = query.shape
    kv_heads, value_dim = value.shape[2], value.shape[3]
    group = heads // kv_heads
    dtype = compute_dtype(query.dtype)
    d_query = torch.zeros(query.shape, dtype=dtype, device=query.device) if needs[0] else None
    # Keys and values receive scattered sums from every row that selected them: accumulate flat over (b, t).
    num_keys = key.shape[1]  # may exceed the query rows (context parallelism: the gathered keys)
    d_key = torch.zeros(batch * num_keys, kv_heads, dim, dtype=dtype, device=query.device) if needs[1] else None
    d_value = torch.zeros(batch * num_keys, kv_heads, value_dim, dtype=dtype, device=query.device) if needs[2] else None
    for start in range(0, seq, rows_per_chunk):
        stop = min(start + rows_per_chunk, seq)
        rows = stop - start
        chunk_slots = slots[:, start:stop]
        keys = _gather_rows(key, chunk_slots).to(dtype)
        values = _gather_rows(value, chunk_slots).to(dtype)
        q_chunk = query[:, start:stop].to(dtype)
        probs, _ = _chunk_probs(q_chunk, keys, chunk_slots, scaling, dtype)
        probs = probs.view(batch, rows, kv_heads, group, -1)
        d_o = d_out[:, start:stop].to(dtype).view(batch, rows, kv_heads, group, value_dim)
        o = out[:, start:stop].to(dtype).view(batch, rows, kv_heads, group, value_dim)
        d_probs = torch.einsum("bcgnv,bckgv->bcgnk", d_o, values)
        delta = (d_o * o).sum(-1, keepdim=True)
        d_scores = probs * (d_probs - delta) * scaling
        batch_rows = torch.arange(batch, device=slots.device)[:, None, None] * num_keys
        flat = (batch_rows + chunk_slots.clamp_min(0)).reshape(-1)
        if d_query is not None:
            d_q = torch.einsum("bcgnk,bckgd->bcgnd", d_scores, keys)
            d_query[:, start:stop] = d_q.reshape(batch, rows, heads, dim)
        if d_key is not None:
            d_k = torch.einsum("bcgnk,bcgnd->bckgd", d_scores, q_chunk.view(batch, rows, kv_heads, group, dim))
            d_key.index_add_(0, flat, d_k.reshape(-1, kv_heads, dim))
        if d_value is not None:
            d_v = torch.einsum("bcgnk,bcgnv->bckgv", probs, d_o)
            d_value.index_add_(0, flat, d_v.reshape(-1, kv_heads, value_dim))
    return (
        None if d_query is None else d_query.to(query.dtype),
        None if d_key is None else d_key.view(key.shape).to(key.dtype),
        None if d_value is None else d_value.view(value.shape).to(value.dtype),
    )


class _SparseAttention(torch.autograd.Function):
    """Forward and backward by the chosen implementation; both recompute the probabilities (no [T, K, D] saved).

    `value_views_key`: the value is an autograd view of the key (the latent form), so a gradient for the key's
    leading columns may carry the value's (see `triton_sparse_backward`).
    """

    @staticmethod
    def forward(ctx, query, key, value, slots, scaling, rows_per_chunk, use_triton, value_views_key):  # type: ignore[override]
        if use_triton:
            from indexcache.kernels.triton_sparse import triton_sparse_forward  # lazy: needs triton and CUDA

            out, lse = triton_sparse_forward(query, key, value, slots, scaling)
        else:
            out, lse = _reference_forward(query, key, value, slots, scaling, rows_per_chunk)
        ctx.save_for_backward(query, key, value, slots, out, lse)
        ctx.scaling, ctx.rows_per_chunk = scaling, rows_per_chunk
        ctx.use_triton, ctx.value_views_key = use_triton, value_views_key
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):  # type: ignore[override]
        query, key, value, slots, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.use_triton:
            from indexcache.kernels.triton_sparse import triton_sparse_backward

            grads = triton_sparse_backward(
                query, key, value, slots, out, d_out, lse, ctx.scaling, ctx.value_views_key and needs[1]
            )
            grads = tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))
        else:
            grads = _reference_backward(query, key, value, slots, out, d_out, ctx.scaling, ctx.rows_per_chunk, needs)
        return (*grads, None, None, None, None, None)


def _value_views_key(key: Tensor, value: Tensor) -> bool:
    """Whether autograd sees the value as a view of the same tensor as the key (the latent form's `key[..., :512]`),
    so that the value's gradient reaches that tensor through the view (a view taken under no_grad would not)."""
    root = key if key._base is None else key._base
    return value.grad_fn is not None and value._base is not None and value._base is root


def _triton_usable(query: Tensor, key: Tensor, value: Tensor) -> bool:
    if not query.is_cuda:
        return False
    try:
        from indexcache.kernels.triton_sparse import triton_supports
    except ImportError:  # no triton on this machine
        return False
    return triton_supports(query, key, value)


def _check(query: Tensor, key: Tensor, value: Tensor, slots: Tensor) -> None:
    """Shapes; keys may outnumber query rows (context parallelism: a rank's rows against the gathered keys)."""
    batch, seq, heads, dim = query.shape
    if key.dim() != 4 or key.shape[0] != batch or key.shape[3] != dim:
        raise ValueError(f"key must be [B={batch}, S, H_kv, D={dim}], got {tuple(key.shape)}")
    if value.dim() != 4 or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be [B, S, H_kv={key.shape[2]}, D_v], got {tuple(value.shape)}")
    if heads % key.shape[2]:
        raise ValueError(f"H={heads} query heads is not a multiple of H_kv={key.shape[2]} key heads")
    if slots.dim() != 3 or slots.shape[:2] != (batch, seq) or slots.dtype != torch.long:
        raise ValueError(f"slots must be int64 [B={batch}, T={seq}, K] from visible_slots, got {tuple(slots.shape)}")


def sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    slots: Tensor,
    scaling: float,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each row over the keys its slots name: output [B, T, H, D_v] and LSE [B, T, H] (see module doc).

    `slots` must come from `visible_slots` (every slot >= 0 is a visible, distinct key of its row): the kernels
    test nothing but `slot >= 0`. The LSE is detached (the teacher's normaliser); the output is differentiable
    w.r.t. query, key and value. `impl`: "reference", "triton" (CUDA) or "auto" (triton where it applies).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is unknown: use one of {IMPLEMENTATIONS}")
    _check(query, key, value, slots)
    use_triton = impl == "triton" or (impl == "auto" and _triton_usable(query, key, value))
    rows = _rows_per_chunk(query, key, value, slots.shape[-1], chunk_size)
    return _SparseAttention.apply(query, key, value, slots, scaling, rows, use_triton, _value_views_key(key, value))


@torch.no_grad()
def sparse_attention_probs(
    query: Tensor,
    key: Tensor,
    slots: Tensor,
    lse: Tensor,
    scaling: float,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """[B, T, K] float32 head-averaged probabilities of the attention on each row's slots (0 on -1 slots).

    p[t, k] = (1/H) sum_h exp(scaling * query[t, h] . key[slot, g(h)] - lse[t, h]): the same gathered keys as the
    forward, normalised by its LSE, so this is the attention's own distribution (the sparse stage's teacher).
    A row without slots is all 0.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is unknown: use one of {IMPLEMENTATIONS}")
    _check(query, key, key, slots)
    if impl == "triton" or (impl == "auto" and _triton_usable(query, key, key)):
        from indexcache.kernels.triton_sparse import triton_sparse_probs

        return triton_sparse_probs(query, key, slots, lse, scaling)
    batch, seq, heads, _ = query.shape
    dtype = compute_dtype(query.dtype)
    rows_per_chunk = _rows_per_chunk(query, key, key, slots.shape[-1], chunk_size)
    probs = torch.zeros(
        slots.shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=query.device
    )
    for start in range(0, seq, rows_per_chunk):
        stop = min(start + rows_per_chunk, seq)
        chunk_slots = slots[:, start:stop]
        keys = _gather_rows(key, chunk_slots)
        kv_heads = key.shape[2]
        grouped = query[:, start:stop].to(dtype).view(batch, stop - start, kv_heads, heads // kv_heads, -1)
        scores = torch.einsum("bcgnd,bckgd->bcgnk", grouped, keys.to(dtype)).reshape(batch, stop - start, heads, -1)
        chunk_lse = lse[:, start:stop].to(dtype)
        finite_lse = torch.where(torch.isfinite(chunk_lse), chunk_lse, torch.zeros_like(chunk_lse))
        head_probs = (scores * scaling - finite_lse[..., None]).exp_()
        head_probs = head_probs.masked_fill_(
            (chunk_slots < 0)[:, :, None, :] | ~torch.isfinite(chunk_lse)[..., None], 0.0
        )
        probs[:, start:stop] = head_probs.mean(dim=2)
    return probs
