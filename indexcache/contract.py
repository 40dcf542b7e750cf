"""The export contract's names, in one torch-free module that the model, the export and the validator all read.

An export carries the tensor groups a run trained (`TRAINED_GROUPS`: the F layers' indexers, and the base when a
stage trained it), each F layer's indexer under the real checkpoint names (`INDEXER_PARTS`), and beside the shards
the record (`RECORD_FILE`) and per-tensor checksums (`CHECKSUM_FILE`). `config.json` gains the pattern keys
(`PATTERN_KEYS`); families that build an indexer on every layer keep S-layer indexer tensors
(`KEEPS_SHARED_INDEXERS`).
"""

from __future__ import annotations

__all__ = [
    "CHECKSUM_FILE",
    "INDEXER_PARTS",
    "KEEPS_SHARED_INDEXERS",
    "PATTERN_KEYS",
    "RECORD_FILE",
    "SINGLE_FILE",
    "TRAINED_GROUPS",
]

INDEXER_PARTS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
KEEPS_SHARED_INDEXERS = {"glm_moe_dsa": False, "deepseek_v32": True, "llama": False, "glm4_moe_lite": False}
PATTERN_KEYS = ("indexer_types", "index_topk_pattern", "use_index_cache", "index_topk_freq", "index_skip_topk_offset")
SINGLE_FILE = "model.safetensors"
RECORD_FILE = "indexcache.json"
CHECKSUM_FILE = "indexcache.tensors.json"
# The parameter groups a stage can train, which are exactly what an export can carry.
TRAINED_GROUPS = ("indexers", "base")
