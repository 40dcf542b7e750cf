"""Multi-layer KL distillation loss for IndexCache (docs/DESIGN.md section 1).

    loss = mean over valid query rows of (1/G) sum_j KL(p_j || q_idx)

with q_idx the F layer's indexer distribution and p_j the head-averaged attention of served layer j, both over
the keys a row sees (causal, non-padding, and in the sparse variant the row's top-k set). Implementations:
`reference` (materialising, fp64-capable, tests only), `chunked` (PyTorch, memory O(chunk x T)), `fused`
(Triton, CUDA). Triton is imported only when the fused path is chosen, so this package imports without it.

The sparse stage's own form (`sparse.py`): the teachers arrive as probabilities on the top-k slots, handed over by
the sparse attention, and the student is gathered at those slots: O(T x K) (`SparseGroupKL`,
`sparse_multi_layer_kl`).
"""

from __future__ import annotations

from torch import Tensor

from indexcache.kernels.config import FusedConfig
from indexcache.losses.chunked import chunked_multi_layer_kl
from indexcache.losses.interface import IndexerOutputs, KLResult, TeacherInputs, validate_inputs
from indexcache.losses.reference import reference_multi_layer_kl
from indexcache.losses.sparse import SparseGroupKL, sparse_multi_layer_kl

__all__ = ["IndexerOutputs", "KLResult", "SparseGroupKL", "TeacherInputs", "multi_layer_kl", "sparse_multi_layer_kl"]

IMPLEMENTATIONS = ("auto", "reference", "chunked", "fused")


def multi_layer_kl(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    attention_mask: Tensor | None,
    topk_indices: Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 1024,
    query_offset: int = 0,
    num_rows: int | None = None,
    fused_config: FusedConfig | None = None,
) -> KLResult:
    """KL of one F group; `teachers[0]` is the F layer itself, then the layers that reuse its indices.

    `query_offset` > 0: the query-side tensors hold the rows at global positions query_offset .. query_offset + T - 1
    and the key-side tensors (indexer k, teacher keys, `attention_mask`) the query_offset + T keys before and among
    them (context parallelism: one chunk of a rank against the gathered keys). `num_rows`: divide the row sums by
    this count instead of the valid rows given (context parallelism: the rows of every rank), so that the ranks'
    losses add up to the one-process loss. `fused_config`: the fused kernels' tiling (default: theirs).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is unknown: use one of {IMPLEMENTATIONS}")
    validate_inputs(indexer, teachers, attention_mask, topk_indices, query_offset)
    whole = query_offset == 0 and num_rows is None
    if impl == "auto":
        impl = "fused" if _fused_usable(indexer, teachers, topk_indices, query_offset, fused_config) else "chunked"
    if impl == "reference":
        if not whole:
            raise ValueError("impl='reference' takes whole sequences: use impl='chunked' with query_offset/num_rows")
        return reference_multi_layer_kl(indexer, teachers, attention_mask, topk_indices)
    if impl == "fused":
        from indexcache.losses.fused import fused_multi_layer_kl  # lazy: needs triton and CUDA

        return fused_multi_layer_kl(
            indexer, teachers, attention_mask, topk_indices, num_rows, query_offset, fused_config
        )
    return chunked_multi_layer_kl(indexer, teachers, attention_mask, topk_indices, chunk_size, query_offset, num_rows)


def _fused_usable(
    indexer: IndexerOutputs,
    teachers: list[TeacherInputs],
    topk_indices: Tensor | None,
    query_offset: int,
    fused_config: FusedConfig | None,
) -> bool:
    if not indexer.q.is_cuda:
        return False
    try:
        from indexcache.losses.fused import fused_supports, offset_supported
    except ImportError:  # no triton on this machine
        return False
    if query_offset and not offset_supported(teachers, topk_indices, query_offset, fused_config):
        return False  # a chunk with a causal offset the kernels do not take runs the chunked path
    return fused_supports(indexer, teachers)
