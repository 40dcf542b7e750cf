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
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer

from indexcache.model.families_common import decoder_attentions, indexer_installer, swap_in_stand_ins
from indexcache.model.indexer import TrainableDeepseekV32Indexer
from indexcache.model.registry import ModelFamily, register_family
from indexcache.model.tiny import TINY_DSA_DIMS


def tiny_deepseek_v32_config(**overrides: object) -> DeepseekV32Config:
    return DeepseekV32Config(**{**TINY_DSA_DIMS, **overrides})


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
        install_indexers=indexer_installer(DeepseekV32Indexer, TrainableDeepseekV32Indexer),
        apply_pattern=swap_in_stand_ins,
        keeps_shared_indexer_tensors=True,
    )
)
