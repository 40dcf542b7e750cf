"""The `indexcache` attention backend: dense or top-k attention, plus teacher capture, for every DSA family.

`IndexCacheModel` registers it with transformers' `AttentionInterface` (and its mask function with
`AttentionMaskInterface`) and sets the model's attention implementation to it, so the stock attention code calls
it without monkey-patching. The family attentions pass their indexer's result as `indices=` and the forward's
`ForwardContext` through the model's `**kwargs`. The mask function builds no [T, S] mask at all: every layer gets
the [B, S] real-key mask when the batch has padding, and None when it has none (packed windows). Then

- dense mode (warm-up): dense causal attention, ignoring the indices. No padding: the causal kernel, no mask; on a
  GPU (bf16/fp16, one key head per query head, as GLM-5 and DeepSeek-V3.2 present their heads after the MLA
  up-projection) through `indexcache.kernels.dense_attention`, which also returns each head's LSE for the teacher.
  Padding: a [B, 1, T, S] mask built here (padded batches only). Context parallelism: the local rows' two chunks,
  each against the gathered keys before and among it (`offset_causal_attention_with_lse`);
- sparse mode: attends only to the layer's top-k set through the gather-based sparse kernel
  (`indexcache.kernels`; a row with fewer visible keys than K attends to all of them), no mask at any length. The
  MLA families call it in the weight-absorbed latent form (`families_common.LatentMlaAttention`). A second pass over
  the same keys gives the teacher probabilities [B, T, K].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from indexcache.kernels import sparse_attention, sparse_attention_probs
from indexcache.kernels.dense_attention import (
    allowed_keys,
    causal_attention_with_lse,
    lse_usable,
    masked_attention_with_lse,
    offset_causal_attention_with_lse,
)
from indexcache.losses import TeacherInputs
from indexcache.model.context import ForwardContext
from indexcache.model.indexer import IndexerSelection

__all__ = ["BACKEND", "indexcache_attention", "padding_mask", "register_backend"]

BACKEND = "indexcache"


def indexcache_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    indices: IndexerSelection | None = None,
    indexcache_context: ForwardContext | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """The `indexcache` attention backend (see the module doc).

    query [B, H, T, D], key [B, H_kv, S, D], value [B, H_kv, S, D_v] after RoPE (S = T, or under context
    parallelism the gathered keys; the MLA families' sparse mode: the latent form, H_kv = 1); `attention_mask` is
    what `padding_mask` made: [B, S] real keys, or None for no padding. Returns [B, T, H, D_v] like the stock
    backends. Dense: torch sdpa (or the aten kernels it dispatches to); it equals stock eager up to float
    round-off. Sparse: `indexcache.kernels.sparse_attention`.
    """
    context = indexcache_context
    if context is None or not context.active or not isinstance(indices, IndexerSelection):
        raise RuntimeError(
            f"the {BACKEND!r} attention backend runs only inside IndexCacheModel.forward, with trainable indexers"
        )
    if context.mode == "sparse":
        return _sparse_attention(module, query, key, value, scaling, dropout, indices, context)
    if context.shard is not None:
        return _context_parallel_dense(module, query, key, value, scaling, dropout, indices, context)
    enable_gqa = query.shape[1] != key.shape[1]
    with_lse = lse_usable(query, key, value)
    logsumexp = None
    kernel = context.kernels.causal_kernel
    if attention_mask is None:
        # No padding: the plain causal kernel (flash on GPU) needs no [T, S] mask at all.
        if with_lse:
            output, logsumexp = causal_attention_with_lse(query, key, value, scaling, dropout, kernel)
        else:
            # Values narrower than q.k (MLA: 16 vs 32 in the tiny models) are zero-padded as for flash on a GPU:
            # otherwise CPU sdpa falls back to its math kernel, which materialises the [T, T] causal mask and scores.
            value_dim = value.shape[-1]
            output = F.scaled_dot_product_attention(
                query,
                key,
                F.pad(value, (0, query.shape[-1] - value_dim)),
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=enable_gqa,
            )[..., :value_dim]
    else:
        allowed = allowed_keys(attention_mask)
        if with_lse:
            output, logsumexp = masked_attention_with_lse(query, key, value, allowed, scaling, dropout)
        else:
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=enable_gqa
            )
    teacher = TeacherInputs(query=query.detach(), key=key.detach(), scaling=scaling, logsumexp=logsumexp)
    context.record(module.layer_idx, indices, teacher)
    return output.transpose(1, 2).contiguous(), None


def _context_parallel_dense(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scaling: float,
    dropout: float,
    selection: IndexerSelection,
    context: ForwardContext,
) -> tuple[Tensor, None]:
    """Dense attention of this rank's two chunks of rows against the gathered keys (no padding, no autograd)."""
    if dropout:
        raise ValueError("attention dropout is unsupported under context parallelism: the teacher is the attention")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError("dense attention under context parallelism has no backward: the warm-up freezes the base")
    if key.shape[1] != query.shape[1]:  # GQA (llama): one key head per query head for the kernels
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    outputs, lses = [], []
    for segment in context.shard.segments:
        rows, keys = segment.local, slice(0, segment.global_stop)
        output, lse = offset_causal_attention_with_lse(
            query[:, :, rows], key[:, :, keys], value[:, :, keys], scaling, segment.global_start,
            context.kernels.causal_kernel,
        )  # fmt: skip
        outputs.append(output)
        lses.append(lse)
    output = torch.cat(outputs, dim=2)
    # The LSE reaches the loss only where the one-process path hands it over too (the same kernels then run).
    logsumexp = torch.cat(lses, dim=2) if lse_usable(query, key, value) else None
    teacher = TeacherInputs(query=query.detach(), key=key.detach(), scaling=scaling, logsumexp=logsumexp)
    context.record(module.layer_idx, selection, teacher)
    return output.transpose(1, 2).contiguous(), None


def _sparse_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scaling: float,
    dropout: float,
    selection: IndexerSelection,
    context: ForwardContext,
) -> tuple[Tensor, None]:
    """Top-k attention by gathering each row's keys, then the teacher: its probabilities on the slots [B, T, K]."""
    if dropout:
        raise ValueError("attention dropout is unsupported in sparse mode: the teacher must be the attention itself")
    slots = context.slots(selection)
    # Token-major views: the kernel gathers whole key rows (for the MLA latent form these are contiguous).
    query_t, key_t, value_t = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    output, lse = sparse_attention(query_t, key_t, value_t, slots, scaling)
    if context.recomputing:  # a checkpointed layer's recomputation: the forward recorded the teacher
        return output, None
    probs = sparse_attention_probs(query_t.detach(), key_t.detach(), slots, lse, scaling)
    teacher = TeacherInputs(query=query.detach(), key=key.detach(), scaling=scaling, probs=probs)
    context.record(module.layer_idx, selection, teacher)
    return output, None


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    **kwargs: object,
) -> Tensor | None:
    """The `indexcache` backend's mask: the [B, S] real-key mask when the batch has padding, else None.

    Never a [T, S] mask: causality is the kernels' business (flash's is_causal; the top-k holds only visible keys),
    and a [B, 1, T, S] mask per forward is what made packed windows at 32K run the slow kernel (issue 9). An all-ones
    mask counts as no padding (one host sync per forward, as sdpa's own mask function does).
    """
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError("the indexcache backend runs whole sequences only (no KV cache)")
    if attention_mask is None:
        return None
    real = attention_mask[:, :kv_length].bool()
    return None if bool(real.all()) else real


def register_backend() -> None:
    """Register the `indexcache` attention backend and its mask function (`padding_mask`); idempotent."""
    AttentionInterface.register(BACKEND, indexcache_attention)
    AttentionMaskInterface.register(BACKEND, padding_mask)
