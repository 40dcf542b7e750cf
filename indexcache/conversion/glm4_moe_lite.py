"""GLM-4.7-Flash (`glm4_moe_lite`, dense MLA attention) -> `glm_moe_dsa` (GLM-5's DSA architecture).

The two transformers implementations are the same network apart from the indexer: identical module trees and
parameter names (q_a_proj / q_a_layernorm / q_b_proj, kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj, o_proj,
dense MLP or MoE with router + e_score_correction_bias + shared experts), the same RMSNorm epsilons, MoE routing,
softmax scale (with yarn mscale) and the same hub layout for experts (both use the `qwen2_moe` checkpoint
conversion: one tensor per expert). So the conversion copies every tensor byte for byte and adds indexers, except:

- RoPE layout: `glm_moe_dsa` always applies interleaved RoPE (pairs (x0, x1), (x2, x3), ...), `glm4_moe_lite`
  does so only when `rope_interleave` is true (GLM-4.7-Flash's value). For a half-split source (pairs
  (x_i, x_{i+d/2})) the roped output rows of `q_b_proj` (per head) and `kv_a_proj_with_mqa` are permuted so that
  row 2i <- i and row 2i+1 <- i + d/2. The interleaved kernel then rotates exactly the pairs the source rotated and
  even writes them in the half-split order, so every q.k product, and the model, is unchanged.
- Q-LoRA is required: glm_moe_dsa has no `q_proj` path (and its indexer reads the query latent), so a source with
  `q_lora_rank = None` cannot be converted exactly and is refused.
- `partial_rotary_factor` other than 1 is refused: glm_moe_dsa's default RoPE ignores it.

Config: the source's, with model_type `glm_moe_dsa`, the index keys, `indexer_types` all "full", explicit
`mlp_layer_types` (glm_moe_dsa's default would be three dense layers) and `first_k_dense_replace` matching them,
`rope_interleave` dropped (implied). Unknown keys (e.g. `num_nextn_predict_layers`) are kept.
The MTP layer `model.layers.{num_hidden_layers}.*`, if present, is copied (permuted like the others) but gets no
indexer: transformers ignores that layer, and its indexer would be untrained anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from transformers import Glm4MoeLiteConfig, GlmMoeDsaConfig, PreTrainedModel

from indexcache.conversion.convert import (
    base_dtype,
    init_indexer_tensors,
    source_folder,
    write_dsa_folder,
)
from indexcache.model.dsa_config import DsaIndexConfig

__all__ = [
    "GLM4_MOE_LITE_INDEX",
    "SOURCE_MODEL_TYPE",
    "TARGET_MODEL_TYPE",
    "convert_glm4_moe_lite_to_dsa",
    "glm_moe_dsa_config",
    "interleave_permutation",
]

SOURCE_MODEL_TYPE = "glm4_moe_lite"
TARGET_MODEL_TYPE = "glm_moe_dsa"
# GLM-5's indexer shape (32 heads x 128, top-2048); its 64 roped dims equal GLM-4.7-Flash's qk_rope_head_dim.
GLM4_MOE_LITE_INDEX = DsaIndexConfig(index_topk=2048, index_n_heads=32, index_head_dim=128)

# Keys of the source config that glm_moe_dsa derives itself or that lose their meaning after conversion.
_DROPPED_KEYS = ("model_type", "architectures", "transformers_version", "rope_interleave", "qk_head_dim", "head_dim")
_ROPED_PROJECTION = re.compile(r"model\.layers\.\d+\.self_attn\.(q_b_proj|kv_a_proj_with_mqa)\.(weight|bias)")


def glm_moe_dsa_config(source: Glm4MoeLiteConfig, index_cfg: DsaIndexConfig) -> GlmMoeDsaConfig:
    """The glm_moe_dsa config of a converted glm4_moe_lite model (every layer "full")."""
    if source.model_type != SOURCE_MODEL_TYPE:
        raise ValueError(f"expected a {SOURCE_MODEL_TYPE} config, got model_type={source.model_type!r}")
    if source.q_lora_rank is None:
        raise ValueError(
            "q_lora_rank is None: glm_moe_dsa needs the query latent (its attention has no q_proj path and its "
            "indexer reads the latent), so this model cannot be converted exactly"
        )
    rope_parameters = source.rope_parameters or {}
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={rope_parameters['partial_rotary_factor']} is not supported by glm_moe_dsa's RoPE"
        )
    rope_dim = index_cfg.index_rope_head_dim or source.qk_rope_head_dim
    if rope_dim != source.qk_rope_head_dim:
        raise ValueError(
            f"index_rope_head_dim={rope_dim}: glm_moe_dsa's indexer ropes qk_rope_head_dim={source.qk_rope_head_dim} "
            "dims; leave index_rope_head_dim unset"
        )
    if index_cfg.index_head_dim < rope_dim:
        raise ValueError(f"index_head_dim={index_cfg.index_head_dim} is smaller than the roped {rope_dim} dims")

    fields = source.to_dict()
    for key in _DROPPED_KEYS:
        fields.pop(key, None)
    mlp_layer_types = list(source.mlp_layer_types)
    num_dense = next((i for i, kind in enumerate(mlp_layer_types) if kind != "dense"), len(mlp_layer_types))
    if mlp_layer_types != ["dense"] * num_dense + ["sparse"] * (len(mlp_layer_types) - num_dense):
        raise ValueError(f"mlp_layer_types={mlp_layer_types}: serving engines need dense layers first, then MoE")
    fields.update(
        index_topk=index_cfg.index_topk,
        index_n_heads=index_cfg.index_n_heads,
        index_head_dim=index_cfg.index_head_dim,
        indexer_types=["full"] * source.num_hidden_layers,
        mlp_layer_types=mlp_layer_types,
        # vLLM / SGLang read first_k_dense_replace rather than mlp_layer_types.
        first_k_dense_replace=num_dense,
        architectures=["GlmMoeDsaForCausalLM"],
    )
    return GlmMoeDsaConfig(**fields)


def interleave_permutation(rope_dim: int) -> Tensor:
    """Row order that makes interleaved RoPE compute half-split RoPE: new row 2i <- i, 2i+1 <- i + rope_dim/2."""
    half = rope_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def _rope_rewrite(source: Glm4MoeLiteConfig) -> Callable[[str], Callable[[Tensor], Tensor] | None] | None:
    """Per-tensor rewrite turning a half-split source into glm_moe_dsa's interleaved layout (None if interleaved)."""
    if source.rope_interleave:
        return None
    rope, nope, kv_rank = source.qk_rope_head_dim, source.qk_nope_head_dim, source.kv_lora_rank
    perm = interleave_permutation(rope)

    def permute_q_b(tensor: Tensor) -> Tensor:
        per_head = tensor.reshape(source.num_attention_heads, nope + rope, *tensor.shape[1:])
        roped = per_head[:, nope:].index_select(1, perm)
        return torch.cat([per_head[:, :nope], roped], dim=1).reshape(tensor.shape)

    def permute_kv_a(tensor: Tensor) -> Tensor:
        return torch.cat([tensor[:kv_rank], tensor[kv_rank:].index_select(0, perm)], dim=0)

    def rewrite(name: str) -> Callable[[Tensor], Tensor] | None:
        match = _ROPED_PROJECTION.fullmatch(name)
        if match is None:
            return None
        return permute_q_b if match.group(1) == "q_b_proj" else permute_kv_a

    return rewrite


def convert_glm4_moe_lite_to_dsa(
    model_or_path: PreTrainedModel | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    index_cfg: DsaIndexConfig = GLM4_MOE_LITE_INDEX,
) -> Path:
    """glm4_moe_lite checkpoint (folder or in-memory model) -> glm_moe_dsa folder that stock transformers loads.

    Streams shard by shard (GLM-4.7-Flash needs no RAM beyond one shard, and none at all when rope_interleave is
    true); indexers are freshly initialised in the base weights' dtype. Atomic; `out_dir` must not exist.
    """
    with source_folder(model_or_path) as source_dir:
        source = Glm4MoeLiteConfig.from_pretrained(source_dir)
        config = glm_moe_dsa_config(source, index_cfg)
        std = index_cfg.init_std or source.initializer_range
        tensors = init_indexer_tensors(
            source.num_hidden_layers, source.hidden_size, source.q_lora_rank, index_cfg, std, base_dtype(source_dir)
        )
        record = {
            "source": str(model_or_path),
            "source_model_type": SOURCE_MODEL_TYPE,
            "index": asdict(index_cfg),
            "rope_rows_permuted_to_interleaved": not source.rope_interleave,
        }
        return write_dsa_folder(source_dir, Path(out_dir), config, tensors, record, _rope_rewrite(source))
