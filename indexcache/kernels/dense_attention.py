"""Dense causal attention with each head's log-sum-exp, for the warm-up's teachers: torch's own kernels, called
through the aten ops `scaled_dot_product_attention` dispatches to (they return the LSE, the public function does not).

- `causal_attention_with_lse`: whole sequences. On a GPU, cuDNN's fused attention on Hopper or torch's
  FlashAttention-2 elsewhere (`causal_kernel`); both are exact attention, and the teacher takes their LSE so the
  fused loss skips its own LSE pass (about a third of its time at 32K, bench/NOTES.md).
- `masked_attention_with_lse`: padded batches only, through the memory-efficient kernel with a [B, 1, T, S] bias
  (the one place such a mask is built; packed windows never come here).
- `offset_causal_attention_with_lse`: context parallelism. A chunk of rows at global positions g .. g + C - 1
  against the keys 0 .. g + C - 1: the keys before the chunk are visible to every row (one non-causal call), the
  chunk's own keys causally (one square causal call), and the two results are merged exactly by their LSEs, so no
  [C, S] mask is built and every kernel that returns an LSE serves (flash, cuDNN, torch's CPU flash kernel). The
  merge has no backward: the warm-up freezes the base, so nothing differentiates the dense attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from indexcache.kernels.config import CAUSAL_KERNELS

__all__ = [
    "allowed_keys",
    "causal_attention_with_lse",
    "causal_kernel",
    "lse_usable",
    "masked_attention_with_lse",
    "offset_causal_attention_with_lse",
]


def allowed_keys(real_BS: Tensor) -> Tensor:
    """[B, 1, T, S] bool keys each row attends to in a padded dense batch: causal and real.

    Built only for batches with padding (packed windows pass none). A row left with no key at all (a query under
    left padding) is given its own position: some CUDA sdpa kernels return NaN for fully masked rows
    (pytorch/pytorch#110213), and 0 * NaN would reach real rows through the values. Stock eager averages all keys
    there instead; no loss reads such rows.
    """
    seq = real_BS.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=real_BS.device).tril()
    allowed = causal[None, None] & real_BS[:, None, None, :]
    empty_rows = ~allowed.any(dim=-1)
    allowed.diagonal(dim1=-2, dim2=-1).logical_or_(empty_rows)
    return allowed


def lse_usable(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether this layer's attention runs through a GPU kernel that hands its LSE to the fused loss.

    CUDA sm80+, bf16/fp16, one key head per query head (GLM-5 and DeepSeek-V3.2 after the MLA up-projection),
    q/k width <= 256 and a value width no wider (flash zero-pads narrower values); anything else takes the
    plain sdpa path. Whatever the loss implementation: the LSE is free, and the same shapes always run the same
    attention kernel (a different kernel's round-off can flip later layers' top-k choices in sparse mode).
    """
    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(query.device)[0] < 8:
        return False
    same_heads = query.shape[1] == key.shape[1] == value.shape[1]
    return same_heads and query.shape[-1] <= 256 and value.shape[-1] <= query.shape[-1]


def causal_kernel(device: torch.device, choice: str | None = None) -> str:
    """The dense causal kernel a GPU runs: `choice` when given, else cuDNN on Hopper and flash elsewhere."""
    if choice is not None:
        if choice not in CAUSAL_KERNELS:
            raise ValueError(f"unknown causal attention kernel {choice!r}: use one of {CAUSAL_KERNELS}")
        return choice
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    return "cudnn" if hopper and torch.backends.cudnn.is_available() else "flash"


def _padded_value(query: Tensor, value: Tensor) -> Tensor:
    """Flash needs equal q/k/v widths: a narrower value is zero-padded (its zero output columns are dropped)."""
    value_dim = value.shape[-1]
    return F.pad(value, (0, query.shape[-1] - value_dim)) if value_dim < query.shape[-1] else value


def _attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, scaling: float, dropout: float, causal: bool, kernel: str | None
) -> tuple[Tensor, Tensor]:
    """[B, H, T, D_v] and [B, H, T] float32 natural-log LSE, detached; `causal` aligns rows and keys at position 0."""
    batch, heads, seq, _ = query.shape
    value_dim = value.shape[-1]
    if not query.is_cuda:
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, _padded_value(query, value), dropout, causal, scale=scaling
        )[:2]
        return output[..., :value_dim], logsumexp.detach().float()
    kernel = causal_kernel(query.device, kernel)
    if kernel == "cudnn":
        output, logsumexp = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, dropout, causal, False, scale=scaling
        )[:2]
        return output, logsumexp.detach().reshape(batch, heads, seq)
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, _padded_value(query, value), dropout, causal, False, scale=scaling
    )[:2]
    return output[..., :value_dim], logsumexp.detach()


def causal_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, scaling: float, dropout: float, kernel: str | None = None
) -> tuple[Tensor, Tensor]:
    """Causal attention [B, H, T, D_v] and each head's natural-log LSE [B, H, T] (float32), detached LSE.

    Differentiable in query/key/value through the aten op's own backward. `kernel` (default: `causal_kernel`)
    picks flash or cuDNN on a GPU; cuDNN takes a value narrower than q.k as it is, flash zero-pads it.
    """
    return _attention_with_lse(query, key, value, scaling, dropout, True, kernel)


def masked_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, allowed: Tensor, scaling: float, dropout: float
) -> tuple[Tensor, Tensor]:
    """Attention over the `allowed` keys ([B, 1, T, S] bool) and each head's natural-log LSE [B, H, T], detached.

    Dense mode with padding only (sparse mode gathers its keys and builds no mask). The memory-efficient kernel is
    the one sdpa runs for a boolean mask on a GPU; called directly it also returns the LSE the fused loss takes. The
    mask becomes the additive bias sdpa would build from it, in the same memory, with rows padded to 16 elements as
    that kernel requires.
    """
    batch, heads, seq, _ = query.shape
    num_keys = allowed.shape[-1]
    aligned = -(-num_keys // 16) * 16
    bias = torch.full((*allowed.shape[:-1], aligned), float("-inf"), dtype=query.dtype, device=query.device)
    bias = bias[..., :num_keys].masked_fill_(allowed, 0.0)
    output, logsumexp = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias.expand(batch, heads, seq, num_keys), True, dropout, False, scale=scaling
    )[:2]
    return output, logsumexp[..., :seq].detach()


@torch.no_grad()
def offset_causal_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, scaling: float, query_offset: int, kernel: str | None = None
) -> tuple[Tensor, Tensor]:
    """Causal attention of rows at global positions query_offset + t over keys [0, query_offset + T) (see the
    module doc): output [B, H, T, D_v] in the query's dtype and LSE [B, H, T] float32. No autograd."""
    seq = query.shape[2]
    if key.shape[2] != query_offset + seq:
        raise ValueError(
            f"key holds {key.shape[2]} positions, but rows at offset {query_offset} see {query_offset + seq}"
        )
    diag_out, diag_lse = _attention_with_lse(
        query, key[:, :, query_offset:], value[:, :, query_offset:], scaling, 0.0, True, kernel
    )
    if query_offset == 0:
        return diag_out, diag_lse
    prefix_out, prefix_lse = _attention_with_lse(
        query, key[:, :, :query_offset], value[:, :, :query_offset], scaling, 0.0, False, kernel
    )
    lse = torch.logaddexp(prefix_lse, diag_lse)
    prefix_weight = torch.exp(prefix_lse - lse)[..., None]
    diag_weight = torch.exp(diag_lse - lse)[..., None]
    output = prefix_out.float() * prefix_weight + diag_out.float() * diag_weight
    return output.to(query.dtype), lse
