"""Dense llama checkpoint -> DSA llama (`LlamaDsaForCausalLM`, indexcache.model.llama_dsa): fresh indexers on every
layer, base tensors copied byte for byte."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from transformers import LlamaConfig, PreTrainedModel

from indexcache.conversion.convert import (
    base_dtype,
    init_indexer_tensors,
    source_folder,
    write_dsa_folder,
)
from indexcache.model.dsa_config import DsaIndexConfig
from indexcache.model.llama_dsa import INDEX_KEYS, LlamaDsaForCausalLM, check_rope_subsampling, llama_index_rope_dim

__all__ = ["SMOLLM2_INDEX", "convert_llama_to_dsa", "llama_dsa_config"]

SMOLLM2_INDEX = DsaIndexConfig(index_topk=256, index_n_heads=4, index_head_dim=64, index_rope_head_dim=32)


def convert_llama_to_dsa(
    model_or_path: PreTrainedModel | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    index_cfg: DsaIndexConfig = SMOLLM2_INDEX,
) -> Path:
    """Dense llama checkpoint (folder or in-memory model) -> DSA llama folder; returns `out_dir`.

    Base tensors are copied byte for byte (an in-memory model is first saved with `save_pretrained`); the indexers
    are freshly initialised (`init_indexer_tensors`) in the dtype of the base weights; the source's tokenizer files
    come along. Written atomically; `out_dir` must not exist.
    """
    with source_folder(model_or_path) as source_dir:
        config = LlamaConfig.from_pretrained(source_dir)
        if any(getattr(config, key, None) is not None for key in INDEX_KEYS):
            raise ValueError(f"{source_dir} is already a DSA llama (its config has index keys)")
        dsa_config = llama_dsa_config(config, index_cfg)
        std = index_cfg.init_std or config.initializer_range
        tensors = init_indexer_tensors(
            config.num_hidden_layers, config.hidden_size, config.hidden_size, index_cfg, std, base_dtype(source_dir)
        )
        record = {"source": str(model_or_path), "source_model_type": "llama", "index": asdict(index_cfg)}
        return write_dsa_folder(source_dir, Path(out_dir), dsa_config, tensors, record)


def llama_dsa_config(config: LlamaConfig, index_cfg: DsaIndexConfig) -> LlamaConfig:
    """A copy of a dense llama config with the DSA keys added (every layer "full" and "indexed_attention")."""
    if config.model_type != "llama":
        raise ValueError(f"expected a llama config, got model_type={config.model_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = llama_index_rope_dim(index_cfg)
    check_rope_subsampling(head_dim, rope)
    fields = config.to_dict()
    fields.pop("architectures", None)
    num_layers = config.num_hidden_layers
    fields.update(
        index_topk=index_cfg.index_topk,
        index_n_heads=index_cfg.index_n_heads,
        index_head_dim=index_cfg.index_head_dim,
        index_rope_head_dim=rope,
        indexer_types=["full"] * num_layers,
        # transformers' DynamicCache gives "indexed_attention" layers the indexer key cache DeepseekV32Indexer uses.
        layer_types=["indexed_attention"] * num_layers,
        architectures=[LlamaDsaForCausalLM.__name__],
    )
    return LlamaConfig.from_dict(fields)
