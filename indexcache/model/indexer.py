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
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer, apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaIndexer, apply_rotary_pos_emb_interleave

from indexcache.losses import IndexerOutputs

RopeFn = Callable[..., tuple[Tensor, Tensor]]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

__all__ = [
    "IndexerSelection",
    "TrainableDeepseekV32Indexer",
    "TrainableGlmMoeDsaIndexer",
    "TrainableIndexer",
    "index_scores",
    "indexer_outputs",
    "key_padding_mask",
    "rebuild_as",
    "select_topk",
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
) -> Tensor:
    """Top-k keys per query row under the causal + padding mask, computed in query-row chunks.

    Args:
        q: [B, T, H_I, D_I] indexer queries (after RoPE).
        k: [B, T, D_I] indexer keys (after k_norm and RoPE).
        w: [B, T, H_I] head weights with every scale folded in.
        attention_mask: [B, T] with 1 for real tokens, 0 for padding (keys that are padding are never chosen), or
            None for no padding.
        topk: how many keys each row keeps.
        chunk_size: query rows scored at once; peak extra memory is a few [B, chunk_size, T] float32 buffers.

    Returns:
        [B, T, K] int64 key positions, K = min(topk, T), each row ordered by decreasing score. A row that sees
        fewer than K keys (early rows, rows near padding) lists all of them and fills the remaining slots with -1;
        consumers must ignore -1 (the loss and the `indexcache` backend do).
    """
    if topk < 1:
        raise ValueError(f"topk={topk} is invalid: a row must keep at least one key")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: use a positive number of query rows")
    batch, seq = q.shape[:2]
    num_keep = min(topk, seq)
    real_BS = (
        torch.ones(batch, seq, dtype=torch.bool, device=q.device) if attention_mask is None else attention_mask.bool()
    )
    out = torch.full((batch, seq, num_keep), -1, dtype=torch.long, device=q.device)
    fused = _triton_index_usable(q, k)
    for start in range(0, seq, chunk_size):
        stop = min(start + chunk_size, seq)
        # Causality: rows [start, stop) never see keys at or beyond `stop`, so they are not scored at all.
        if fused:
            from indexcache.kernels.triton_index import triton_index_scores

            scores = triton_index_scores(q, k, w, attention_mask, start, stop)
        else:
            scores = index_scores(q[:, start:stop], k[:, :stop], w[:, start:stop])
            query_pos = torch.arange(start, stop, device=q.device)[:, None]
            key_pos = torch.arange(stop, device=q.device)[None, :]
            visible = (key_pos <= query_pos)[None] & real_BS[:, None, :stop]
            scores = scores.masked_fill(~visible, float("-inf"))
        values, indices = scores.topk(min(num_keep, stop), dim=-1)
        # Only invisible keys score -inf (visible scores are finite sums of relus): those slots become -1.
        out[:, start:stop, : indices.shape[-1]] = indices.masked_fill(values == float("-inf"), -1)
    return out


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
      the same scores (int64, -1 for missing keys; skipped when `compute_topk` is False, e.g. in dense warm-up);
    - no KV cache: training and evaluation run whole sequences.
    A subclass names only its family's RoPE function (`rope`, the stock indexer's layout).
    """

    rope: ClassVar[RopeFn]
    compute_topk: bool = True
    chunk_size: int = 1024  # query rows per top-k chunk

    def forward(
        self,
        hidden_states: Tensor,
        q_resid: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        position_ids: Tensor | None = None,
        past_key_values: object | None = None,
    ) -> IndexerSelection:
        if past_key_values is not None:
            raise ValueError("trainable indexers run on whole sequences only: call the model with use_cache=False")
        outputs = indexer_outputs(self, hidden_states, q_resid, position_embeddings, self.rope)
        topk_indices = None
        if self.compute_topk:
            topk_indices = select_topk(
                outputs.q, outputs.k, outputs.w, key_padding_mask(attention_mask), self.index_topk, self.chunk_size
            )
        return IndexerSelection(layer_idx=self.layer_idx, outputs=outputs, topk_indices=topk_indices)


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
