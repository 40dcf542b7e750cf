"""The loss's public data types, input validation and the masks every implementation shares.

Every implementation (reference, chunked, fused) must agree on which keys a query row sees and which rows carry
loss; keeping those rules here, in one place, is what makes the parity tests meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class IndexerOutputs:
    """The F layer's indexer, WITH autograd to the indexer parameters."""

    q: Tensor  # [B, T, H_I, D_I] after RoPE
    k: Tensor  # [B, T, D_I] after k_norm and RoPE (one key head)
    w: Tensor  # [B, T, H_I] every scale folded in: I[t,s] = sum_j w[t,j] * relu(q[t,j] . k[s])


@dataclass
class TeacherInputs:
    """One served layer's main attention, detached (no grad)."""

    query: Tensor  # [B, H, T, D] after RoPE, as the attention kernel sees it
    key: Tensor  # [B, H_kv, T, D]
    scaling: float  # the attention's softmax scale
    # Optional [B, H, T] float32: natural-log log-sum-exp of scaling * q.k over the keys each row sees in this
    # loss (causal and real; in the sparse variant the row's selected set), as attention kernels return it (flash's
    # softmax_lse, cuDNN's softmax stats). When every teacher has it, the fused path skips recomputing it (its pass A).
    logsumexp: Tensor | None = None
    # Optional [B, T, K] float32, sparse stage: the attention's own head-averaged probabilities on the F layer's
    # top-k slots (`visible_slots` order, 0 on -1 slots), handed over by the sparse attention. The sparse loss
    # (`SparseGroupKL`) reads only this; query/key stay for observers (evaluation statistics).
    probs: Tensor | None = None


@dataclass
class KLResult:
    loss: Tensor  # scalar: mean over valid rows of (1/G) sum_j KL(p_j || q_idx); grad -> q, k, w
    kl_per_layer: Tensor  # [G] detached, same normalisation, the F layer first
    teacher_entropy: Tensor  # [G] detached, mean over valid rows of H(p_j)
    num_rows: int  # valid query rows


def validate_inputs(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    attention_mask: Tensor | None,
    topk_indices: Tensor | None,
    query_offset: int = 0,
) -> None:
    """Raise ValueError naming the offending tensor when shapes disagree (user error, not an invariant).

    Query-side tensors (indexer q and w, teacher queries and LSE, top-k) hold T rows, the global positions
    query_offset .. query_offset + T - 1; key-side tensors (indexer k, teacher keys, the mask) hold the
    S = query_offset + T keys those rows may see (context parallelism: a rank's chunk against the gathered keys).
    """
    if query_offset < 0:
        raise ValueError(f"query_offset={query_offset} is invalid: use the global position of the first row (>= 0)")
    if indexer.q.dim() != 4:
        raise ValueError(f"indexer.q must be [B, T, H_I, D_I], got shape {tuple(indexer.q.shape)}")
    batch, seq, num_idx_heads, idx_dim = indexer.q.shape
    num_keys = query_offset + seq
    if tuple(indexer.k.shape) != (batch, num_keys, idx_dim):
        raise ValueError(f"indexer.k must be [B, S, D_I]={(batch, num_keys, idx_dim)}, got {tuple(indexer.k.shape)}")
    if tuple(indexer.w.shape) != (batch, seq, num_idx_heads):
        raise ValueError(f"indexer.w must be [B, T, H_I]={(batch, seq, num_idx_heads)}, got {tuple(indexer.w.shape)}")
    if not teachers:
        raise ValueError("teachers is empty: give at least the F layer's own attention")
    for pos, teacher in enumerate(teachers):
        query, key = teacher.query, teacher.key
        if query.dim() != 4 or query.shape[0] != batch or query.shape[2] != seq:
            raise ValueError(f"teachers[{pos}].query must be [B={batch}, H, T={seq}, D], got {tuple(query.shape)}")
        num_heads, head_dim = query.shape[1], query.shape[3]
        if key.dim() != 4 or key.shape[0] != batch or key.shape[2] != num_keys or key.shape[3] != head_dim:
            raise ValueError(
                f"teachers[{pos}].key must be [B={batch}, H_kv, S={num_keys}, D={head_dim}], got {tuple(key.shape)}"
            )
        if num_heads % key.shape[1] != 0:
            raise ValueError(
                f"teachers[{pos}]: H={num_heads} query heads is not a multiple of H_kv={key.shape[1]} key heads"
            )
        lse = teacher.logsumexp
        if lse is not None and tuple(lse.shape) != (batch, num_heads, seq):
            raise ValueError(
                f"teachers[{pos}].logsumexp must be [B={batch}, H={num_heads}, T={seq}], got {tuple(lse.shape)}"
            )
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, num_keys):
        raise ValueError(f"attention_mask must be [B, S]={(batch, num_keys)}, got {tuple(attention_mask.shape)}")
    if topk_indices is not None:
        if topk_indices.dim() != 3 or tuple(topk_indices.shape[:2]) != (batch, seq):
            raise ValueError(f"topk_indices must be [B={batch}, T={seq}, K], got {tuple(topk_indices.shape)}")
        if topk_indices.dtype.is_floating_point or topk_indices.dtype == torch.bool:
            raise ValueError(f"topk_indices must be an integer tensor, got {topk_indices.dtype}")


def key_mask(attention_mask: Tensor | None, batch: int, seq: int, device: torch.device) -> Tensor:
    """[B, T] bool: True for real (non-padding) tokens."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    return attention_mask.to(device=device).bool()


def selected_entries(
    topk_indices: Tensor, real: Tensor, first_row: int = 0, row_positions: Tensor | None = None
) -> Tensor:
    """[B, R, K] bool: which top-k entries name a key visible from their row (not -1, s <= t, s real).

    `topk_indices` holds rows first_row .. first_row + R - 1 of the sequence (all of it by default), or the rows at
    `row_positions` [R] (global positions, context parallelism); `real` [B, S] covers every key.
    """
    batch, rows, _ = topk_indices.shape
    if row_positions is None:
        row_positions = torch.arange(first_row, first_row + rows, device=topk_indices.device)
    row = row_positions.to(topk_indices.device).view(1, rows, 1)
    in_range = (topk_indices >= 0) & (topk_indices <= row)
    keys = topk_indices.clamp(0, real.shape[1] - 1).reshape(batch, -1)
    return in_range & torch.gather(real, 1, keys).view_as(topk_indices)


def valid_rows(real: Tensor, topk_indices: Tensor | None, query_offset: int = 0) -> Tensor:
    """[B, T] bool: rows that carry loss (`real` [B, S] covers the keys; rows are S - query_offset .. S - 1).

    A real query row always sees itself in the dense variant; in the sparse variant a row whose selected set has
    no visible key has no distribution to match, so it carries no loss and is not counted.
    """
    rows = real[:, query_offset:]
    if topk_indices is None:
        return rows
    return rows & selected_entries(topk_indices, real, first_row=query_offset).any(dim=-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Query rows per chunk of `visible_slots`: its sort's temporaries are a few [B, rows, K] int64 tensors (at 256K tokens
# and K 2048 a whole-sequence pass would hold ~4 GiB each; a 4096-row chunk, 64 MiB).
VISIBLE_SLOTS_CHUNK_ROWS = 4096


def visible_slots(
    topk_indices: Tensor,
    real: Tensor | None,
    chunk_rows: int = VISIBLE_SLOTS_CHUNK_ROWS,
    row_positions: Tensor | None = None,
) -> Tensor:
    """[B, T, K] int64: `topk_indices` with -1 in every slot that names no key its row may attend to.

    A slot is dropped when it is -1 already, names a future key (s > t) or a padding key (`real` [B, T] bool False;
    None: no padding), or repeats a key an earlier slot of the row names (the top-k is a set: a repeated key must
    not count twice in a softmax). Keys stay in their slots, so slot k of the result is slot k of the input. Rows are
    independent, so they are done `chunk_rows` at a time: only the result is of size [B, T, K].

    `row_positions` [T] gives the rows' global positions when they are not 0 .. T - 1 (context parallelism: a
    rank's two chunks); `real` [B, S] then covers all S keys (None: no padding).
    """
    batch, seq, _ = topk_indices.shape
    if real is None:
        num_keys = seq if row_positions is None else int(row_positions.max()) + 1
        real = torch.ones(batch, num_keys, dtype=torch.bool, device=topk_indices.device)
    out = torch.empty(topk_indices.shape, dtype=torch.long, device=topk_indices.device)
    for start in range(0, seq, chunk_rows):
        chunk = topk_indices[:, start : start + chunk_rows]
        positions = None if row_positions is None else row_positions[start : start + chunk_rows]
        keyed = torch.where(selected_entries(chunk, real, first_row=start, row_positions=positions), chunk.long(), -1)
        ordered, order = keyed.sort(dim=-1, stable=True)  # stable: the earliest slot of a repeated key stays
        repeat_sorted = torch.zeros_like(ordered, dtype=torch.bool)
        repeat_sorted[..., 1:] = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        repeat = torch.zeros_like(repeat_sorted).scatter_(-1, order, repeat_sorted)
        out[:, start : start + chunk_rows] = keyed.masked_fill_(repeat, -1)
    return out
