"""Tiny configs and models for every family, built from config (no download): CPU tests and CPU defaults.

Each family owns its tiny config (`ModelFamily.tiny_config`, so adding a family stays one file); the DSA families
share the dimensions below. They keep every structural feature of the real models (Q-LoRA, MLA with separate
rope/nope widths and v_head_dim, a dense first layer then MoE, a multi-head indexer) at sizes that run in
milliseconds, with index_topk small enough that sequences of a few dozen tokens are really sparse.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from indexcache.model.registry import get_family

TINY_DSA_DIMS: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    # One expert group: the real models' 8 groups need at least 8 experts.
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "index_n_heads": 4,
    "index_head_dim": 32,
    "index_topk": 8,
    "max_position_embeddings": 512,
    # Wider than the real 0.02: at these sizes 0.02 gives near-uniform attention and indexer distributions, which
    # would let parity and loss tests pass for the wrong reasons.
    "initializer_range": 0.1,
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of the family registered for `model_type`, with `overrides` applied."""
    return get_family(model_type).tiny_config(**overrides)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny stock model (fp32, eval mode); the same seed gives the same weights."""
    family = get_family(model_type)
    config = family.tiny_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.build(config)
    return model.eval()
