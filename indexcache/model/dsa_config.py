"""What a DSA checkpoint's config adds to a dense one: the lightning indexers' shape and initialisation.

Model code (the families read it, e.g. the llama DSA family's tiny config); dense-to-DSA conversion
(indexcache.conversion) builds on it, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DsaIndexConfig:
    """Shape and initialisation of the lightning indexers a dense-to-DSA conversion adds.

    index_rope_head_dim: roped indexer dims. None = the family's default (llama: index_head_dim // 2; glm4_moe_lite:
        the model's qk_rope_head_dim, the only value transformers' glm_moe_dsa supports).
    init_std: std of the normal init of wq_b / wk / weights_proj (k_norm starts at the identity). None = the
        source config's initializer_range, what transformers would use.
    seed: the indexers' init is a function of (seed, shapes) only, so a conversion is reproducible.
    """

    index_topk: int
    index_n_heads: int
    index_head_dim: int
    index_rope_head_dim: int | None = None
    init_std: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("index_topk", "index_n_heads", "index_head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: use a positive integer")
        rope = self.index_rope_head_dim
        if rope is not None and (rope < 2 or rope % 2 or rope > self.index_head_dim):
            raise ValueError(
                f"index_rope_head_dim={rope} is invalid: use an even number in [2, {self.index_head_dim}] "
                "(the indexer's width)"
            )
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} is invalid: use a positive std (or None)")
