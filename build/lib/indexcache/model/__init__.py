"""Model side of IndexCache: indexer maths, the family registry, the families, and IndexCacheModel.

Importing this package registers every family (one file each), so `get_family` knows them all.
"""

from indexcache.model import deepseek_v32, glm_moe_dsa, llama_dsa  # noqa: F401  (registers the families)
from indexcache.model.indexer import IndexerSelection, index_scores, select_topk
from indexcache.model.registry import ModelFamily, get_family, known_families, register_family
from indexcache.model.wrapper import IndexCacheModel, IndexCacheOutput

__all__ = [
    "IndexCacheModel",
    "IndexCacheOutput",
    "IndexerSelection",
    "ModelFamily",
    "get_family",
    "index_scores",
    "known_families",
    "register_family",
    "select_topk",
]
