"""Kernel choices of one model, fixed at construction and carried by every forward (`ForwardContext.kernels`).

Nothing reassigns a module global to change a kernel: a benchmark or test that wants another choice builds its
own `KernelConfig` and gives it to `IndexCacheModel(..., kernels=...)`. Torch-free, so configs and checks can
import it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CAUSAL_KERNELS",
    "LOSS_IMPLEMENTATIONS",
    "FusedConfig",
    "KernelConfig",
    "ScorerTiles",
    "SparseKLTiling",
    "TopkFilter",
]

CAUSAL_KERNELS = ("flash", "cudnn")
LOSS_IMPLEMENTATIONS = ("auto", "reference", "chunked", "fused")


@dataclass(frozen=True)
class FusedConfig:
    """The fused dense loss's block shapes (`indexcache.losses.fused`); bench/kernel_kl.py times variants
    (bench/NOTES.md has the measurements)."""

    lse_rows: int = 128  # pass A
    lse_cols: int = 128
    lse_warps: int = 8
    lse_stages: int = 2  # pass A: Q [128, 256] + 2 K stages of [128, 256] bf16 = 192 KiB of shared memory
    tile_rows: int = 128  # passes C0 and C1
    tile_cols: int = 128
    tile_depth: int = 64  # C1 multiplies Q K^T in chunks of this many channels, so 3 stages fit in shared memory
    tile_warps: int = 8
    tile_stages: int = 3
    tile_group: int = 8  # row blocks whose tiles run side by side, so their Q and K tiles are shared in L2
    heads_per_launch: int = 0  # C1 launches per layer split its heads into slabs of this many; 0: all heads
    dq_rows: int = 64  # pass D: rows per program, keys per step (both must divide tile_rows and tile_cols)
    dq_cols: int = 64
    dq_warps: int = 4
    dk_rows: int = 64  # pass E: rows per step, keys per program (likewise)
    dk_cols: int = 64
    dk_warps: int = 4
    stages: int = 2  # passes C0, D, E
    scratch_bytes: int = 512 * 2**20  # one row chunk's logits, dI and (with head slabs) partial p


@dataclass(frozen=True)
class SparseKLTiling:
    """The sparse KL kernels' step (`indexcache.losses.sparse_fused`): slots per step and warps per program."""

    block_slots: int = 128  # H200, G=4 at 32K: 128 -> 38.7 ms, 64 -> 40.6, 32 -> 54.9 (8 warps: slower)
    warps: int = 4


@dataclass(frozen=True)
class ScorerTiles:
    """The top-k scorer's launch (`indexcache.kernels.triton_index`): a [rows, keys] output tile per program, its
    warps and pipeline stages; bench/topk.py times the alternatives."""

    rows: int = 64
    keys: int = 64
    warps: int = 4
    stages: int = 3

    def __str__(self) -> str:
        return f"r{self.rows}k{self.keys}w{self.warps}s{self.stages}"


@dataclass(frozen=True)
class TopkFilter:
    """The top-k's exact candidate filter (`indexer.select_topk`): every `key_step`-th key is scored first, and the
    K-th best of that subset is each row's threshold; the full scorer then keeps only the keys at or above it, in a
    buffer of `headroom * key_step * K` slots a row, and the top-k is taken among those. Any subset's K-th best is at
    most the row's K-th best, so the result is the same as without the filter; a row whose buffer overflows, or
    holds fewer than K keys, is redone from its chunk's full scores. Chunks whose rows see no more keys than the buffer
    holds skip it."""

    key_step: int = 16
    headroom: float = 1.25  # the buffer over the expected count (key_step * K; its relative spread is ~1/sqrt(K))

    def __post_init__(self) -> None:
        if self.key_step < 2:
            raise ValueError(f"topk_filter.key_step={self.key_step} is invalid: use 2 or more (every n-th key)")
        if self.headroom < 1:
            raise ValueError(f"topk_filter.headroom={self.headroom} is invalid: use 1 or more")

    def capacity(self, topk: int) -> int:
        """Candidate slots a row: headroom * key_step * K, rounded up to 64, and at least K + 1."""
        slots = -(-int(self.headroom * self.key_step * topk) // 64) * 64
        return max(slots, topk + 1)


@dataclass(frozen=True)
class KernelConfig:
    # The dense causal kernel with its LSE on a GPU: "flash" (torch's FlashAttention-2), "cudnn" (cuDNN's fused
    # attention), or None: cuDNN on Hopper, where it ran 2.1-2.5x faster at GLM-5 and DeepSeek-V3.2 widths on an
    # H200 (bench/dense_attention.py), flash elsewhere.
    causal_kernel: str | None = None
    loss_impl: str = "auto"  # the dense multi-layer KL: see `indexcache.losses.multi_layer_kl`
    loss_chunk_size: int = 1024  # query rows per chunk of the chunked (PyTorch) dense loss
    topk_chunk_size: int = 1024  # query rows scored at once by the indexer's top-k
    topk_scorer: ScorerTiles = field(default_factory=ScorerTiles)  # the top-k scorer's tiles (CUDA)
    # The top-k's exact candidate filter, or None (off: 7-19% slower than without on an H100 at 128K, bench/NOTES.md
    # versions 10 and 12).
    topk_filter: TopkFilter | None = None
    lm_chunk_size: int = 2048  # rows per block of the chunked LM cross-entropy
    fused_loss: FusedConfig = field(default_factory=FusedConfig)  # the fused dense loss's tiling (CUDA)
    sparse_kl: SparseKLTiling = field(default_factory=SparseKLTiling)  # the sparse KL kernels' step (CUDA)

    def __post_init__(self) -> None:
        if self.causal_kernel is not None and self.causal_kernel not in CAUSAL_KERNELS:
            raise ValueError(f"unknown causal attention kernel {self.causal_kernel!r}: use one of {CAUSAL_KERNELS}")
        if self.loss_impl not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss_impl={self.loss_impl!r} is unknown: use one of {LOSS_IMPLEMENTATIONS}")
        for name in ("loss_chunk_size", "topk_chunk_size", "lm_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: use a positive number of rows")
