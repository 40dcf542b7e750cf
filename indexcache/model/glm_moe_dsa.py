"""GLM-5 (`glm_moe_dsa`): the DSA family whose transformers code already shares top-k across layers.

What differs from stock, and why:
- Every layer's `GlmMoeDsaIndexer` becomes a `TrainableGlmMoeDsaIndexer` holding the same tensors under the same
  names (`model.layers.{i}.self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`): it is differentiable and hands the
  loss its q/k/w, where the stock one only returns indices under no_grad.
- A pattern is applied to the live model the way transformers builds one from `config.indexer_types`: S layers get
  `skip_topk=True` and `indexer=None`, and the stock `prev_topk_indices` hand-over then gives them the F layer's
  selection. Doing it in place (instead of rebuilding from the config) keeps every F layer's own weights, which
  is where training starts; the indexers of S layers stay in the wrapper's pool so a later pattern may revive them.
- Every layer's attention becomes an `IndexCacheGlmMoeDsaAttention` (same submodules, same names): in sparse mode
  it attends in the weight-absorbed latent form, which the gather-based sparse kernel reads once per row for all
  heads (`families_common.LatentMlaAttention`); it hands its indexer the [B, S] padding mask (or None), since the
  `indexcache` backend builds no [T, S] mask.
- Exports drop S-layer indexer tensors: serving engines build no indexer on shared layers.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import (
    GlmMoeDsaAttention,
    GlmMoeDsaIndexer,
    apply_rotary_pos_emb_interleave,
)

from indexcache.model.context import CONTEXT_KWARG
from indexcache.model.families_common import (
    LatentMlaAttention,
    decoder_attentions,
    indexer_installer,
    latent_weights,
    record_pattern_in_config,
)
from indexcache.model.indexer import IndexerSelection, TrainableGlmMoeDsaIndexer
from indexcache.model.registry import ModelFamily, SharedIndexerFactory, register_family
from indexcache.model.tiny import TINY_DSA_DIMS
from indexcache.pattern import IndexCachePattern


def tiny_glm_moe_dsa_config(**overrides: object) -> GlmMoeDsaConfig:
    # Explicit all-F layer types: the pattern is IndexCacheModel's business, not the tiny config's.
    fields = {**TINY_DSA_DIMS, **overrides}
    fields.setdefault("indexer_types", ["full"] * fields["num_hidden_layers"])
    return GlmMoeDsaConfig(**fields)


class IndexCacheGlmMoeDsaAttention(LatentMlaAttention, GlmMoeDsaAttention):
    """GLM-MoE-DSA attention under IndexCacheModel: sparse mode in the weight-absorbed latent form.

    Differs from `GlmMoeDsaAttention.forward` only after the stock projections (see `LatentMlaAttention` for the
    maths and why): the indexer gets the [B, S] padding mask (or None) instead of a [B, T, S] causal mask, and the
    attention runs on the latents in sparse mode. The stock cross-layer sharing (`prev_topk_indices`, `skip_topk`)
    is kept as is. No KV cache.
    """

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None,
        past_key_values: object | None = None,
        position_ids: Tensor | None = None,
        prev_topk_indices: IndexerSelection | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, Tensor | None, IndexerSelection]:
        if past_key_values is not None:
            raise ValueError("IndexCache attention runs whole sequences only: call the model with use_cache=False")
        q_resid, q_pass, q_rot, k_pass, k_rot = self.latent_projections(
            hidden_states, position_embeddings, apply_rotary_pos_emb_interleave
        )
        if self.indexer is not None:
            selection = self.indexer(
                hidden_states,
                q_resid,
                position_embeddings,
                attention_mask,
                position_ids,
                context=kwargs.get(CONTEXT_KWARG),
            )
        elif prev_topk_indices is None:
            raise ValueError("Shared DSA layers require top-k indices from a previous full indexer layer.")
        else:
            selection = prev_topk_indices
        output, weights = self.attend(q_pass, q_rot, k_pass, k_rot, selection, attention_mask, **kwargs)
        return output, weights, selection


def _build(config: PretrainedConfig) -> PreTrainedModel:
    return GlmMoeDsaForCausalLM._from_config(config)


def _load(path: str | os.PathLike[str], dtype: torch.dtype) -> PreTrainedModel:
    return GlmMoeDsaForCausalLM.from_pretrained(path, dtype=dtype)


def _apply_pattern(
    model: PreTrainedModel,
    pattern: IndexCachePattern,
    indexers: dict[int, nn.Module],
    shared_indexer: SharedIndexerFactory,
) -> None:
    record_pattern_in_config(model, pattern, indexers)
    for layer_idx, attention in enumerate(decoder_attentions(model)):
        full = pattern.is_full(layer_idx)
        attention.skip_topk = not full
        attention.indexer = indexers[layer_idx] if full else None


GLM_MOE_DSA = register_family(
    ModelFamily(
        model_type="glm_moe_dsa",
        build=_build,
        load=_load,
        tiny_config=tiny_glm_moe_dsa_config,
        dsa_attentions=decoder_attentions,
        install_indexers=indexer_installer(GlmMoeDsaIndexer, TrainableGlmMoeDsaIndexer, IndexCacheGlmMoeDsaAttention),
        apply_pattern=_apply_pattern,
        weights_read_outside_forward=latent_weights,
    )
)
