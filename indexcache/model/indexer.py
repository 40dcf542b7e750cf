"""Lightning-indexer maths shared by every DSA family: the scorer, memory-bounded top-k, trainable indexers.

    I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])        (docs/DESIGN.md section 1; causal: s <= t)

`w` carries every scale (the checkpoints' `softmax_scale = D_I^-0.5` and the `H_I^-0.5` head average), folded in
because relu(c * x) = c * relu(x) for c > 0: the scores, and so the top-k, are those of the stock indexers.

The trainable indexers subclass the stock HF modules, so their parameters keep the real checkpoint names
(`wq_b`, `wk`, `k_norm`, `weights_proj`) and the stock attention code calls them unchanged. They return an
`IndexerSelection` instead of a bare index tensor; under the `indexcache` attention backend (see `wrapper.py`) the
stock attention hands that object to the backend as `indices=` without looking inside it. (Under eager/sdpa the
stock attention would scatter the return value into a mask, so trainable indexers run only under `indexcache`.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer, apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaIndexer, apply_rotary_pos_emb_interleave

from indexcache.kernels.config import KernelConfig, ScorerTiles, TopkFilter
from indexcache.losses import IndexerOutputs

if TYPE_CHECKING:
    from indexcache.model.context import ForwardContext

RopeFn = Callable[..., tuple[Tensor, Tensor]]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

__all__ = [
    "IndexerSelection",
    "TrainableDeepseekV32Indexer",
    "TrainableGlmMoeDsaIndexer",
    "TrainableIndexer",
    "index_candidates",
    "index_scores",
    "indexer_outputs",
    "key_padding_mask",
    "rebuild_as",
    "select_topk",
    "topk_lowest_index_ties",
]


@dataclass
class IndexerSelection:
    """What a DSA layer's indexer hands to its attention: the F layer's outputs and its top-k set.

    S layers receive the very same object (GLM: through the stock `prev_topk_indices`; DeepSeek-V3.2: through
    `wrapper.SharedIndexer`), so `layer_idx` always names the F layer that computed it.
    """

    layer_idx: int
    outputs: IndexerOutputs  # with autograd to the F layer's indexer parameters
    topk_indices: Tensor | None  # [B, T, K] int64, -1 = no key; None when the top-k was skipped (dense mode)


def index_scores(q_BTHD: Tensor, k_BSD: Tensor, w_BTH: Tensor) -> Tensor:
    """[B, T, S] indexer scores I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s]), unmasked.

    Accumulated in float32 like the stock scorer (float64 inputs stay float64, for references). Heads are added one
    at a time, so the memory is a few [B, T, S] buffers, never [B, T, H_I, S].
    """
    dtype = torch.float64 if q_BTHD.dtype == torch.float64 else torch.float32
    q, k, w = q_BTHD.to(dtype), k_BSD.to(dtype), w_BTH.to(dtype)
    k_BDS = k.transpose(1, 2)
    scores_BTS = q.new_zeros(q.shape[0], q.shape[1], k.shape[1])
    for head in range(q.shape[2]):
        scores_BTS = scores_BTS + w[:, :, head, None] * torch.relu(torch.bmm(q[:, :, head], k_BDS))
    return scores_BTS


@torch.no_grad()
def select_topk(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    attention_mask: Tensor | None,
    topk: int,
    chunk_size: int = 1024,
    query_offset: int = 0,
    scorer_tiles: ScorerTiles | None = None,
    topk_filter: TopkFilter | None = None,
) -> Tensor:
    """Top-k keys per query row under the causal + padding mask, computed in query-row chunks.

    Args:
        q: [B, T, H_I, D_I] indexer queries (after RoPE) of the rows at global positions query_offset + t.
        k: [B, S, D_I] indexer keys (after k_norm and RoPE), S = query_offset + T: every key those rows may see.
        w: [B, T, H_I] head weights with every scale folded in.
        attention_mask: [B, S] with 1 for real tokens, 0 for padding (keys that are padding are never chosen), or
            None for no padding.
        topk: how many keys each row keeps.
        chunk_size: query rows scored at once; peak extra memory is a few [B, chunk_size, S] float32 buffers.
        query_offset: the global position of the first row (context parallelism: a rank's chunk against the
            gathered keys); 0 for a whole sequence.
        scorer_tiles: the Triton scorer's launch on CUDA (None: its default); the scores do not depend on it beyond
            round-off of the per-tile products.
        topk_filter: the exact candidate filter (see `TopkFilter`), or None: every chunk's scores are written whole.
            The result is the same either way.

    Returns:
        [B, T, K] int64 key positions, K = min(topk, S), each row ordered by decreasing score. A row that sees
        fewer than K keys (early rows, rows near padding) lists all of them and fills the remaining slots with -1;
        consumers must ignore -1 (the loss and the `indexcache` backend do).

    Ties: among keys of equal score the lower key position wins, both for membership (a tie across the K-th place
    keeps the lowest positions) and for the order within the row. The result is therefore a function of the scores
    alone, the same for every chunk size, device and scorer that produces those scores (`torch.topk` alone leaves
    tied members to its algorithm; exact ties are common, e.g. rows whose keys all score 0 after the ReLU).
    """
    if topk < 1:
        raise ValueError(f"topk={topk} is invalid: a row must keep at least one key")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: use a positive number of query rows")
    batch, seq = q.shape[:2]
    num_keys = query_offset + seq
    if k.shape[1] != num_keys:
        raise ValueError(f"k holds {k.shape[1]} keys, but rows at offset {query_offset} see {num_keys}")
    num_keep = min(topk, num_keys)
    real_BS = (
        torch.ones(batch, num_keys, dtype=torch.bool, device=q.device)
        if attention_mask is None
        else attention_mask.bool()
    )
    out = torch.full((batch, seq, num_keep), -1, dtype=torch.long, device=q.device)
    fused = _triton_index_usable(q, k)

    capacity = None if topk_filter is None else topk_filter.capacity(num_keep)

    def chunk_scores(start: int, stop: int, key_step: int = 1) -> Tensor:
        # Causality: rows before `key_stop` never see keys at or beyond it, so they are not scored at all.
        # key_step > 1: only keys 0, key_step, 2 key_step, ... (the candidate filter's subset).
        key_stop = query_offset + stop
        if fused:
            from indexcache.kernels.triton_index import triton_index_scores

            return triton_index_scores(q, k, w, attention_mask, start, stop, query_offset, scorer_tiles, key_step)
        scores = index_scores(q[:, start:stop], k[:, :key_stop:key_step], w[:, start:stop])
        query_pos = torch.arange(query_offset + start, key_stop, device=q.device)[:, None]
        key_pos = torch.arange(0, key_stop, key_step, device=q.device)[None, :]
        visible = (key_pos <= query_pos)[None] & real_BS[:, None, :key_stop:key_step]
        return scores.masked_fill(~visible, float("-inf"))

    def chunk_candidates(start: int, stop: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """The keys scoring at or above the subset's K-th best, and the rows for which that is not exact."""
        subset = chunk_scores(start, stop, topk_filter.key_step)
        # -inf where the subset holds fewer than `width` visible keys: then every visible key is a candidate.
        tau = subset.topk(min(width, subset.shape[-1]), dim=-1, sorted=False).values.amin(dim=-1)
        if fused:
            from indexcache.kernels.triton_index import triton_index_candidates

            found = triton_index_candidates(
                q, k, w, attention_mask, start, stop, tau, capacity, query_offset, scorer_tiles
            )
        else:
            found = index_candidates(chunk_scores(start, stop), tau, capacity)
        values, keys, counts = found
        # Exact iff the buffer holds every key >= tau and at least `width` of them (with tau = -inf: every visible
        # key). Fewer than `width` with a finite tau means the subset's scores and the full ones disagreed.
        redo = (counts > capacity) | ((counts < width) & (tau > float("-inf")))
        return values, keys, redo

    def write(start: int, stop: int, values: Tensor, indices: Tensor) -> None:
        # Only invisible keys score -inf (visible scores are finite sums of relus): those slots become -1.
        out[:, start:stop, : indices.shape[-1]] = indices.masked_fill(values == float("-inf"), -1)

    flagged: list[tuple[int, int, int, Tensor]] = []
    for start in range(0, seq, chunk_size):
        stop = min(start + chunk_size, seq)
        width = min(num_keep, query_offset + stop)  # the chunk's last row sees query_offset + stop keys
        if capacity is not None and query_offset + stop > capacity:  # the buffer is narrower than the scores
            candidates, keys, redo = chunk_candidates(start, stop, width)
            values, indices, straddles = topk_flagging_ties(candidates, width, keys)
            straddles = redo if straddles is None else straddles | redo
        else:
            values, indices, straddles = topk_flagging_ties(chunk_scores(start, stop), width)
        write(start, stop, values, indices)
        if straddles is not None:
            flagged.append((start, stop, width, straddles))
    # Rows whose K-th score ties a key left out (and rows the candidate filter could not answer exactly) are
    # redone under the rule, after one host sync for the whole call (a sync per chunk would stall the GPU on every
    # chunk's launches). Their chunk is scored again, whole, by the same scorer, so the scores, and hence the ties,
    # are the same ones; only the flagged rows go through the rule (exact float32 ties are common on long rows, so
    # most chunks hold a few).
    if flagged:
        hits = torch.cat([straddles.flatten() for *_, straddles in flagged]).nonzero().flatten()
        sizes = torch.tensor([0] + [straddles.numel() for *_, straddles in flagged]).cumsum(0)
        bounds = torch.searchsorted(hits.cpu(), sizes).tolist()  # hits[bounds[i]:bounds[i + 1]] fall in chunk i
        for i, (start, stop, width, _) in enumerate(flagged):
            rows = hits[bounds[i] : bounds[i + 1]] - int(sizes[i])  # flat (batch, row) positions in the chunk
            if rows.numel():
                values, indices = topk_lowest_index_ties(chunk_scores(start, stop).flatten(0, 1)[rows], width)
                chunk_rows = stop - start
                batch_of, row_of = rows // chunk_rows, start + rows % chunk_rows
                out[batch_of, row_of, :width] = indices.masked_fill(values == float("-inf"), -1)
    return out


def topk_flagging_ties(scores: Tensor, width: int, keys: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The top-k of each row in `topk_lowest_index_ties`'s order, and which rows it may have got wrong.

    A row's members are unique unless its K-th value equals the best value left out; then (`straddles` [...] True)
    which of the tied keys are members is `torch.topk`'s own choice, and the caller redoes the row with
    `topk_lowest_index_ties`. One `torch.topk` of K + 1 finds that out without another pass over the scores and
    without a host sync. Ties at -inf are not flagged: those slots name invisible keys and become -1, whichever
    keys they were. `straddles` is None when every key is kept (no key is left out).

    `keys`: the key position of each column of `scores` (the candidate filter's buffer), or None: the column
    index. The returned indices are key positions.
    """
    if width >= scores.shape[-1]:
        values, indices = scores.topk(width, dim=-1, sorted=False)
        straddles = None
    else:
        values, indices = scores.topk(width + 1, dim=-1)  # sorted: slot `width` holds the best key left out
        kth, left_out = values[..., width - 1], values[..., width]
        straddles = (kth == left_out) & (kth > float("-inf"))
        values, indices = values[..., :width], indices[..., :width]
    if keys is not None:
        indices = torch.gather(keys, -1, indices).long()
    return (*_by_score_then_index(values, indices), straddles)


def _by_score_then_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The members `indices` (with their scores `values`) ordered by decreasing score, the lower index first
    among equal scores."""
    indices, by_index = indices.sort(dim=-1)
    values = torch.gather(values, -1, by_index)
    values, by_score = values.sort(dim=-1, descending=True, stable=True)  # stable: lower indices stay first
    return values, torch.gather(indices, -1, by_score)


def index_candidates(scores: Tensor, tau: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch reference of `triton_index_candidates`, from a chunk's masked scores [B, c, S] (-inf: invisible).

    Returns the visible keys scoring >= `tau` [B, c]: values [B, c, capacity] (-inf in unused slots), key positions
    [B, c, capacity] int32 (in increasing order here; 0 in unused slots) and counts [B, c] int32 (above `capacity`
    when the row's keys did not fit; those beyond it are dropped).
    """
    keep = (scores >= tau[..., None]) & (scores > float("-inf"))
    counts = keep.sum(dim=-1, dtype=torch.int32)
    slot = keep.cumsum(dim=-1) - 1
    batch_i, row_i, key_i = (keep & (slot < capacity)).nonzero(as_tuple=True)
    at = (batch_i, row_i, slot[batch_i, row_i, key_i])
    values = scores.new_full((*scores.shape[:-1], capacity), float("-inf"))
    keys = torch.zeros(*scores.shape[:-1], capacity, dtype=torch.int32, device=scores.device)
    values[at] = scores[batch_i, row_i, key_i]
    keys[at] = key_i.to(torch.int32)
    return values, keys, counts


# Rows whose tie at the K-th place is repaired at once (the repair's cumulative count is [rows, S] int32).
TIE_REPAIR_ROWS = 256


def topk_lowest_index_ties(scores: Tensor, width: int, order: str = "score") -> tuple[Tensor, Tensor]:
    """`torch.topk(scores, width)` along the last dim with one tie rule: among equal scores the lower index wins.

    Membership: where the K-th value is tied with values left out, the tied members become the lowest-index ones
    (only those rows are redone). Order: `"score"` by decreasing score, then increasing index; `"index"` by
    increasing index (one sort fewer: the same members). -inf scores take part like any other value (the caller
    masks them).
    """
    if order not in ("score", "index"):
        raise ValueError(f"order={order!r} is unknown: use 'score' or 'index'")
    values, indices = scores.topk(width, dim=-1, sorted=False)  # the order is rebuilt below
    threshold = values.amin(dim=-1, keepdim=True)
    tied_total = (scores == threshold).sum(dim=-1)
    tied_kept = (values == threshold).sum(dim=-1)
    straddled = (tied_total > tied_kept).nonzero(as_tuple=True)
    if straddled[0].numel():
        flat_scores = scores[straddled]  # [n, S]: only rows whose tie crosses the K-th place
        flat_threshold = threshold[straddled]
        flat_indices = torch.empty(flat_scores.shape[0], width, dtype=indices.dtype, device=indices.device)
        for first in range(0, flat_scores.shape[0], TIE_REPAIR_ROWS):
            rows = slice(first, first + TIE_REPAIR_ROWS)
            row_scores, row_threshold = flat_scores[rows], flat_threshold[rows]
            above = row_scores > row_threshold
            tied = row_scores == row_threshold
            needed = width - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
            rank = tied.to(torch.int32).cumsum(dim=-1, dtype=torch.int32)
            chosen = above | (tied & (rank <= needed))  # exactly `width` per row
            flat_indices[rows] = chosen.nonzero()[:, 1].view(-1, width)
        indices = indices.clone()
        indices[straddled] = flat_indices
    if order == "score":
        return _by_score_then_index(torch.gather(scores, -1, indices), indices)
    indices, _ = indices.sort(dim=-1)
    return torch.gather(scores, -1, indices), indices


def _triton_index_usable(q: Tensor, k: Tensor) -> bool:
    """Whether the masked scores come from the Triton kernel (CUDA, bf16/fp16): one pass instead of one per head."""
    if not q.is_cuda:
        return False
    try:
        from indexcache.kernels.triton_index import triton_index_supports
    except ImportError:  # no triton on this machine
        return False
    return triton_index_supports(q, k)


def key_padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, S] bool real-key mask from what the attention hands the indexer.

    Under the `indexcache` backend that is already the [B, S] real-key mask (or None: no padding), since that
    backend builds no [T, S] mask. The stock eager/sdpa paths hand the [B, T, S] (or [B, 1, T, S]) causal mask:
    without a KV cache its last query row sees every non-padding key, so that row is the padding mask. Boolean
    masks mark visible keys True; additive float masks mark them 0.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    last_row = attention_mask[..., -1, :]
    if last_row.dim() == 3:
        last_row = last_row[:, 0]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def indexer_outputs(
    indexer: GlmMoeDsaIndexer | DeepseekV32Indexer,
    hidden_states: Tensor,
    q_resid: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    rope: RopeFn,
) -> IndexerOutputs:
    """The indexer's q, k, w with autograd to its parameters only (its inputs are detached).

    Same projections as the stock forward; `rope` is the family's RoPE function (called with unsqueeze_dim=2).
    q and k keep the projection dtype; w is float32 like the stock scorer (weights_proj is kept in fp32).
    """
    # Detached inputs: the indexer learns only from the KL, and the KL must not reach the base model.
    hidden_states, q_resid = hidden_states.detach(), q_resid.detach()
    batch, seq, _ = hidden_states.shape
    rope_dim = indexer.qk_rope_head_dim
    cos, sin = position_embeddings
    q = indexer.wq_b(q_resid).view(batch, seq, indexer.n_heads, indexer.head_dim)
    q_rot, q_pass = torch.split(q, [rope_dim, indexer.head_dim - rope_dim], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [rope_dim, indexer.head_dim - rope_dim], dim=-1)
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float()
    w = weights * (indexer.softmax_scale * indexer.n_heads**-0.5)
    return IndexerOutputs(q=q, k=k, w=w)


class TrainableIndexer:
    """What makes a stock HF indexer trainable; mixed in before the stock class, whose parameters and names it keeps.

    Differs from the stock forward, and why:
    - differentiable (the stock one runs under no_grad): it is what IndexCache trains;
    - its inputs are detached, so the KL reaches only the indexer and the LM loss never reaches it;
    - returns an `IndexerSelection`: the `IndexerOutputs` (q after RoPE [B, T, H_I, D_I], k [B, T, D_I],
      w [B, T, H_I] with softmax_scale * H_I^-0.5 folded in) the loss needs, plus the top-k indices computed from
      the same scores (int64, -1 for missing keys; skipped when the forward's context says dense warm-up);
    - no KV cache: training and evaluation run whole sequences.
    A subclass names only its family's RoPE function (`rope`, the stock indexer's layout).
    """

    rope: ClassVar[RopeFn]

    def forward(
        self,
        hidden_states: Tensor,
        q_resid: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        position_ids: Tensor | None = None,
        past_key_values: object | None = None,
        context: ForwardContext | None = None,
    ) -> IndexerSelection:
        """`context` (IndexCacheModel's per-forward state) says whether to compute the top-k (sparse mode), its
        chunk size, and under context parallelism this rank's share: the key is then all-gathered (its gradient
        summed back to the owners) and each local run of rows takes its top-k against the keys it may see."""
        if past_key_values is not None:
            raise ValueError("trainable indexers run on whole sequences only: call the model with use_cache=False")
        outputs = indexer_outputs(self, hidden_states, q_resid, position_embeddings, self.rope)
        shard = None if context is None else context.shard
        if shard is not None:
            outputs = IndexerOutputs(q=outputs.q, k=context.gather_keys(outputs.k, dim=1), w=outputs.w)
        topk_indices = None
        recorded = None if context is None else context.recorded_selection(self.layer_idx)
        if recorded is not None:  # a checkpointed layer's recomputation: the forward's top-k, not a new selection
            topk_indices = recorded.topk_indices
        elif context is None or context.compute_topk:
            kernels = KernelConfig() if context is None else context.kernels
            chunk_size, tiles, screen = kernels.topk_chunk_size, kernels.topk_scorer, kernels.topk_filter
            mask = key_padding_mask(attention_mask) if shard is None else context.key_mask
            if shard is None:
                topk_indices = select_topk(
                    outputs.q,
                    outputs.k,
                    outputs.w,
                    mask,
                    self.index_topk,
                    chunk_size,
                    scorer_tiles=tiles,
                    topk_filter=screen,
                )
            else:
                # Every run as wide as the whole sequence's top-k (an early run sees fewer keys: -1 slots).
                width = min(self.index_topk, shard.seq_len)
                topk_indices = torch.cat(
                    [
                        _padded_slots(
                            select_topk(
                                outputs.q[:, segment.local],
                                outputs.k[:, : segment.global_stop],
                                outputs.w[:, segment.local],
                                None if mask is None else mask[:, : segment.global_stop],
                                self.index_topk,
                                chunk_size,
                                query_offset=segment.global_start,
                                scorer_tiles=tiles,
                                topk_filter=screen,
                            ),
                            width,
                        )
                        for segment in shard.segments
                    ],
                    dim=1,
                )
        return IndexerSelection(layer_idx=self.layer_idx, outputs=outputs, topk_indices=topk_indices)


def _padded_slots(topk_indices: Tensor, width: int) -> Tensor:
    """[B, T, width] with -1 in the slots beyond `topk_indices`' own."""
    return torch.nn.functional.pad(topk_indices, (0, width - topk_indices.shape[-1]), value=-1)


class TrainableGlmMoeDsaIndexer(TrainableIndexer, GlmMoeDsaIndexer):
    """GLM-MoE-DSA indexer that can be trained (see `TrainableIndexer`); interleaved RoPE, as its stock forward."""

    rope = staticmethod(apply_rotary_pos_emb_interleave)


class TrainableDeepseekV32Indexer(TrainableIndexer, DeepseekV32Indexer):
    """DeepSeek-V3.2 indexer that can be trained (see `TrainableIndexer`); half-split RoPE, as its stock forward."""

    rope = staticmethod(apply_rotary_pos_emb)


def rebuild_as(stock: nn.Module, subclass: type[ModuleT]) -> ModuleT:
    """A `subclass` module made of `stock`'s own submodules (same Parameter objects, names, dtypes).

    `subclass` is a subclass of the stock class that adds behaviour, not tensors (a trainable indexer, a family's
    IndexCache attention). `stock` must carry `config` and `layer_idx`, as the HF indexers and attentions do. The
    new module is built on the meta device and then given the stock submodules, so swapping allocates nothing (even
    for GLM-5) and keeps whatever is attached to the Parameter objects (e.g. DeepSpeed ZeRO-3 partitioning).
    """
    with torch.device("meta"):
        rebuilt = subclass(stock.config, stock.layer_idx)
    for name, child in stock.named_children():
        setattr(rebuilt, name, child)
    if list(stock.named_parameters(recurse=False)) or list(stock.named_buffers(recurse=False)):
        raise ValueError(f"{type(stock).__name__} holds tensors outside its submodules: rebuild_as cannot move them")
    if rebuilt.state_dict().keys() != stock.state_dict().keys():
        raise ValueError(f"{subclass.__name__} and {type(stock).__name__} have different parameters")
    rebuilt.train(stock.training)
    return rebuilt
