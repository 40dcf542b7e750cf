"""DeepSeek-V3.2 (`deepseek_v32`): a DSA family whose transformers code has no cross-layer top-k sharing.

What differs from stock, and why:
- Every layer's `DeepseekV32Indexer` becomes a `TrainableDeepseekV32Indexer` holding the same tensors under the
  same names: differentiable, and it hands the loss its q/k/w (half-split RoPE, as stock).
- Sharing is ours: an S layer's indexer is replaced by the wrapper's parameter-free stand-in, which returns the
  owning F layer's selection from the per-forward context. The stock attention then uses it exactly as if its
  own indexer had produced it. The S layer's own (untrained) indexer stays in the wrapper's pool.
- Exports keep S-layer indexer tensors (copied from the source): transformers builds an indexer on every layer,
  so a checkpoint without them would not load.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, PretrainedConfig, PreTrainedModel

from indexcache.model.indexer import TrainableDeepseekV32Indexer, to_trainable
from indexcache.model.registry import ModelFamily, SharedIndexerFactory, register_family
from indexcache.model.tiny import TINY_DSA_DIMS
from indexcache.pattern import IndexCachePattern


def tiny_deepseek_v32_config(**overrides: object) -> DeepseekV32Config:
    return DeepseekV32Config(**{**TINY_DSA_DIMS, **overrides})


def _build(config: PretrainedConfig) -> PreTrainedModel:
    return DeepseekV32ForCausalLM._from_config(config)


def _load(path: str | os.PathLike[str], dtype: torch.dtype) -> PreTrainedModel:
    return DeepseekV32ForCausalLM.from_pretrained(path, dtype=dtype)


def dsa_attentions(model: PreTrainedModel) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers[: model.config.num_hidden_layers]]


def _install_indexers(model: PreTrainedModel) -> dict[int, nn.Module]:
    pool: dict[int, nn.Module] = {}
    for layer_idx, attention in enumerate(dsa_attentions(model)):
        attention.indexer = to_trainable(attention.indexer, TrainableDeepseekV32Indexer)
        pool[layer_idx] = attention.indexer
    return pool


def _apply_pattern(
    model: PreTrainedModel,
    pattern: IndexCachePattern,
    indexers: dict[int, nn.Module],
    shared_indexer: SharedIndexerFactory,
) -> None:
    for layer_idx, attention in enumerate(dsa_attentions(model)):
        if pattern.is_full(layer_idx):
            attention.indexer = indexers[layer_idx]
        else:
            attention.indexer = shared_indexer(layer_idx, pattern.owner(layer_idx))


DEEPSEEK_V32 = register_family(
    ModelFamily(
        model_type="deepseek_v32",
        build=_build,
        load=_load,
        tiny_config=tiny_deepseek_v32_config,
        dsa_attentions=dsa_attentions,
        install_indexers=_install_indexers,
        apply_pattern=_apply_pattern,
        keeps_shared_indexer_tensors=True,
    )
)
