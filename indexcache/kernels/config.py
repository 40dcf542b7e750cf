"""Kernel choices of one model, fixed at construction and carried by every forward (`ForwardContext.kernels`).

Nothing reassigns a module global to change a kernel: a benchmark or test that wants another choice builds its
own `KernelConfig` and gives it to `IndexCacheModel(..., kernels=...)`. Torch-free, so configs and checks can
import it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAUSAL_KERNELS", "LOSS_IMPLEMENTATIONS", "KernelConfig"]

CAUSAL_KERNELS = ("flash", "cudnn")
LOSS_IMPLEMENTATIONS = ("auto", "reference", "chunked", "fused")


@dataclass(frozen=True)
class KernelConfig:
    # The dense causal kernel with its LSE on a GPU: "flash" (torch's FlashAttention-2), "cudnn" (cuDNN's fused
    # attention), or None: cuDNN on Hopper, where it ran 2.1-2.5x faster at GLM-5 and DeepSeek-V3.2 widths on an
    # H200 (bench/dense_attention.py), flash elsewhere.
    causal_kernel: str | None = None
    loss_impl: str = "auto"  # the dense multi-layer KL: see `indexcache.losses.multi_layer_kl`
    loss_chunk_size: int = 1024  # query rows per chunk of the chunked (PyTorch) dense loss
    topk_chunk_size: int = 1024  # query rows scored at once by the indexer's top-k
    lm_chunk_size: int = 2048  # rows per block of the chunked LM cross-entropy

    def __post_init__(self) -> None:
        if self.causal_kernel is not None and self.causal_kernel not in CAUSAL_KERNELS:
            raise ValueError(f"unknown causal attention kernel {self.causal_kernel!r}: use one of {CAUSAL_KERNELS}")
        if self.loss_impl not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss_impl={self.loss_impl!r} is unknown: use one of {LOSS_IMPLEMENTATIONS}")
        for name in ("loss_chunk_size", "topk_chunk_size", "lm_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: use a positive number of rows")
