"""DeepSeek-V3.2 (`deepseek_v32`): a DSA family whose transformers code has no cross-layer top-k sharing.

What differs from stock, and why:
- Every layer's `DeepseekV32Indexer` becomes a `TrainableDeepseekV32Indexer` holding the same tensors under the
  same names: differentiable, and it hands the loss its q/k/w (half-split RoPE, as stock).
- Sharing is ours: an S layer's indexer is replaced by the wrapper's parameter-free stand-in, which returns the
  owning F layer's selection from the per-forward context. The stock attention then uses it exactly as if its
  own indexer had produced it. The S layer's own (untrained) indexer stays in the wrapper's pool.
- Every layer's attention becomes an `IndexCacheDeepseekV32Attention` (same submodules, same names): in sparse
  mode it attends in the weight-absorbed latent form (`families_common.LatentMlaAttention`), and it hands its
  indexer the [B, S] padding mask (or None), since the `indexcache` backend builds no [T, S] mask.
- Exports keep S-layer indexer tensors (copied from the source): transformers builds an indexer on every layer,
  so a checkpoint without them would not load.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
    DeepseekV32Attention,
    DeepseekV32Indexer,
    apply_rotary_pos_emb_interleave,
)

from indexcache.model.context import CONTEXT_KWARG
from indexcache.model.families_common import (
    LatentMlaAttention,
    decoder_attentions,
    indexer_installer,
    swap_in_stand_ins,
)
from indexcache.model.indexer import TrainableDeepseekV32Indexer
from indexcache.model.registry import ModelFamily, register_family
from indexcache.model.tiny import TINY_DSA_DIMS


def tiny_deepseek_v32_config(**overrides: object) -> DeepseekV32Config:
    return DeepseekV32Config(**{**TINY_DSA_DIMS, **overrides})


class IndexCacheDeepseekV32Attention(LatentMlaAttention, DeepseekV32Attention):
    """DeepSeek-V3.2 attention under IndexCacheModel: sparse mode in the weight-absorbed latent form.

    Differs from `DeepseekV32Attention.forward` only after the stock projections (see `LatentMlaAttention` for the
    maths and why): the indexer (or an S layer's stand-in) gets the [B, S] padding mask (or None) instead of a
    [B, T, S] causal mask, and the attention runs on the latents in sparse mode. No KV cache.
    """

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        past_key_values: object | None = None,
        position_ids: Tensor | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, Tensor | None]:
        if past_key_values is not None:
            raise ValueError("IndexCache attention runs whole sequences only: call the model with use_cache=False")
        q_resid, q_pass, q_rot, k_pass, k_rot = self.latent_projections(
            hidden_states, position_embeddings, apply_rotary_pos_emb_interleave
        )
        selection = self.indexer(
            hidden_states, q_resid, position_embeddings, attention_mask, position_ids, context=kwargs.get(CONTEXT_KWARG)
        )
        return self.attend(q_pass, q_rot, k_pass, k_rot, selection, attention_mask, **kwargs)


def _build(config: PretrainedConfig) -> PreTrainedModel:
    return DeepseekV32ForCausalLM._from_config(config)


def _load(path: str | os.PathLike[str], dtype: torch.dtype) -> PreTrainedModel:
    return DeepseekV32ForCausalLM.from_pretrained(path, dtype=dtype)


DEEPSEEK_V32 = register_family(
    ModelFamily(
        model_type="deepseek_v32",
        build=_build,
        load=_load,
        tiny_config=tiny_deepseek_v32_config,
        dsa_attentions=decoder_attentions,
        install_indexers=indexer_installer(
            DeepseekV32Indexer, TrainableDeepseekV32Indexer, IndexCacheDeepseekV32Attention
        ),
        apply_pattern=swap_in_stand_ins,
    )
)
