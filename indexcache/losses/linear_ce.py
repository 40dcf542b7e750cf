"""Causal-LM cross-entropy from the final hidden states and the LM-head weight, without a [tokens, vocab] tensor.

At long context the logits are the largest tensor of a step (128K tokens x a 150K-token vocabulary is ~40 GB in
bf16, twice that for the float32 copy the loss takes), so the LM loss never builds them:

- `chunked` (training and evaluation): per block of `chunk_size` rows it computes the block's logits, their
  log-sum-exp and loss, and, when a gradient is wanted, at once the gradient of the mean loss w.r.t. the block's
  logits, which it turns into the block's hidden-state gradient and adds into a float32 weight gradient (float64
  for float64 inputs). Backward only scales those by the incoming gradient. Three head-sized matmuls in all, like
  the materialised path, and transient memory of a few [chunk_size, vocab] blocks. This is liger-kernel's
  fused-linear-cross-entropy design in plain PyTorch, so it runs on CPU.
- `liger`: liger-kernel's fused linear cross-entropy (Triton, CUDA), with a float32 weight-gradient accumulator;
  it fuses the softmax and its gradient into one pass over each block, which `chunked` does in several. On an
  H200 with GLM-5's head (6144 x 154,880, bf16; `bench/linear_ce.py`, bench/results_h200_linear_ce.txt) a
  forward+backward at 32K tokens took 299 ms and 5.7 GiB, against 378 ms and 7.5 GiB for `chunked` and 329 ms
  and 57 GiB for the materialised logits; at 128K 1.14 s and 7.4 GiB against 1.51 s and 8.6 GiB. All paths have
  the same error against float32 (loss 3e-7, gradients 3e-3). `auto` picks liger for CUDA tensors when
  liger-kernel is installed, `chunked` otherwise.
- `reference`: materialised logits and `F.cross_entropy`, as HF's `ForCausalLMLoss` computes it; tests only.

Semantics are HF's `ForCausalLMLoss` as `*ForCausalLM.forward` calls it (no `num_items_in_batch`): labels are
shifted left by one (the last position predicts nothing), targets equal to `ignore_index` are skipped, the loss is
the mean over the remaining targets, logits are computed by the head in the model's dtype and upcast to float32
for the softmax (float64 stays float64, for exact tests). With no valid target the mean is 0/0 = NaN, as in HF.
The three families' heads are a plain bias-free linear map with no logit soft-cap or scale (`check_plain_head`),
so that is all this computes.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMPLEMENTATIONS",
    "CausalLMLoss",
    "causal_lm_loss",
    "check_plain_head",
    "linear_cross_entropy",
    "reference_linear_cross_entropy",
    "shift_labels",
]

IMPLEMENTATIONS = ("auto", "chunked", "liger", "reference")
IGNORE_INDEX = -100


def shift_labels(labels_BT: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """HF's causal shift: position t is scored on label t+1; the last position on nothing (`ignore_index`)."""
    return F.pad(labels_BT[:, 1:], (0, 1), value=ignore_index)


def causal_lm_loss(
    hidden_BTD: Tensor,
    weight_VD: Tensor,
    labels_BT: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 2048,
    impl: str = "auto",
) -> Tensor:
    """HF's causal-LM loss (float32 scalar) of `hidden_BTD @ weight_VD.T` against `labels_BT` (shifted inside)."""
    targets_N = shift_labels(labels_BT, ignore_index).reshape(-1)
    hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    return linear_cross_entropy(hidden_ND, weight_VD, targets_N, ignore_index, chunk_size, impl)


def reference_linear_cross_entropy(
    hidden_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Materialised [N, V] logits and F.cross_entropy: HF's `ForCausalLMLoss` after the shift (tests only).

    HF upcasts the logits with `.float()`; here float64 stays float64, so tests can use it as an exact reference.
    """
    logits_NV = F.linear(hidden_ND, weight_VD)
    logits_NV = logits_NV.to(_compute_dtype(logits_NV.dtype))
    return F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index)


def linear_cross_entropy(
    hidden_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 2048,
    impl: str = "auto",
) -> Tensor:
    """Mean cross-entropy of the rows of `hidden_ND @ weight_VD.T` against `targets_N`, `chunk_size` rows at a time.

    Targets are already aligned with the rows (no shift). Differentiable in `hidden_ND` and `weight_VD`.
    `chunk_size` is for `chunked`; liger sizes its own chunks (about N x D logits elements at a time).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is unknown: use one of {IMPLEMENTATIONS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    if hidden_ND.dim() != 2 or targets_N.shape != hidden_ND.shape[:1] or weight_VD.shape[1] != hidden_ND.shape[1]:
        raise ValueError(
            f"expected hidden [N, D], weight [V, D] and targets [N]; got {tuple(hidden_ND.shape)}, "
            f"{tuple(weight_VD.shape)} and {tuple(targets_N.shape)}"
        )
    if impl == "reference":
        return reference_linear_cross_entropy(hidden_ND, weight_VD, targets_N, ignore_index)
    needs_grad = torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad)
    if not needs_grad:
        # Evaluation, or an LM loss that is only reported: one matmul per chunk, no gradient buffers, no autograd
        # node, whatever `impl` (liger would compute gradients for any input that requires them).
        return _chunked_loss_and_grads(hidden_ND, weight_VD, targets_N, ignore_index, chunk_size, False, False)[0]
    if impl == "auto":
        impl = "liger" if hidden_ND.is_cuda and importlib.util.find_spec("liger_kernel") is not None else "chunked"
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # lazy: Triton, CUDA

        return liger_fused_linear_cross_entropy(
            hidden_ND, weight_VD, targets_N, ignore_index=ignore_index, accum_dtype=torch.float32
        )
    return _ChunkedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, ignore_index, chunk_size)


class CausalLMLoss(nn.Module):
    """Parameter-free module around `causal_lm_loss`: the LM loss as a module call of its own.

    A module so that hooks that manage parameters per module see the head weight's use: ZeRO-3 gathers a
    partitioned parameter only around the forward and backward of a module it is registered with, and the head
    weight is used here, not in the head's own forward (the wrapper registers it as this module's external
    parameter). The gradient reaches the weight before the end of backward, so it must still be gathered then.
    """

    def __init__(self, chunk_size: int = 2048, impl: str = "auto") -> None:
        super().__init__()
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl={impl!r} is unknown: use one of {IMPLEMENTATIONS}")
        self.chunk_size, self.impl = chunk_size, impl

    def forward(self, hidden_BTD: Tensor, weight_VD: Tensor, labels_BT: Tensor, aligned: bool = False) -> Tensor:
        """The LM loss; `aligned=True`: `labels_BT` are already the targets of each position (`shift_labels`)."""
        if not aligned:
            return causal_lm_loss(hidden_BTD, weight_VD, labels_BT, chunk_size=self.chunk_size, impl=self.impl)
        hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        return linear_cross_entropy(
            hidden_ND, weight_VD, labels_BT.reshape(-1), IGNORE_INDEX, self.chunk_size, self.impl
        )

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, impl={self.impl}"


def check_plain_head(head: nn.Module, config: object) -> nn.Linear:
    """The LM head if it is what `linear_cross_entropy` computes (bias-free linear, no soft-cap or scale)."""
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"the LM head must be a bias-free nn.Linear for the chunked LM loss, got {head}")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"config.{name}={getattr(config, name)!r}: the chunked LM loss has no logit transform")
    return head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Gradients computed in the forward, chunk by chunk (see the module doc); backward scales them."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden_ND: Tensor,
        weight_VD: Tensor,
        targets_N: Tensor,
        ignore_index: int,
        chunk_size: int,
    ) -> Tensor:
        loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden_ND,
            weight_VD,
            targets_N,
            ignore_index,
            chunk_size,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight_VD.dtype
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            # Scaled in float32 and rounded once, straight into the weight's dtype: no second float32 [V, D] copy.
            scaled = torch.empty_like(grad_weight, dtype=ctx.weight_dtype)
            grad_weight = torch.mul(grad_weight, grad_loss, out=scaled)
        return grad_hidden, grad_weight, None, None, None


def _chunked_loss_and_grads(
    hidden_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int,
    chunk_size: int,
    grad_hidden_wanted: bool,
    grad_weight_wanted: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(mean loss, d loss / d hidden, d loss / d weight in float32+); a gradient is None unless wanted."""
    hidden_ND, weight_VD = hidden_ND.detach(), weight_VD.detach()
    compute_dtype = _compute_dtype(hidden_ND.dtype)
    valid_N = targets_N != ignore_index
    # A tensor, not a Python number: no host sync. No valid target -> 0/0 = NaN, as in HF.
    num_valid = valid_N.sum().to(compute_dtype)
    loss_sum = torch.zeros((), dtype=compute_dtype, device=hidden_ND.device)
    grad_hidden = torch.empty_like(hidden_ND) if grad_hidden_wanted else None
    grad_weight = torch.zeros_like(weight_VD, dtype=compute_dtype) if grad_weight_wanted else None
    for start in range(0, hidden_ND.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        hidden_CD, valid_C = hidden_ND[rows], valid_N[rows]
        # Ignored targets read class 0 and are masked out below.
        targets_C1 = torch.where(valid_C, targets_N[rows], 0)[:, None]
        # F.linear in the model's dtype, then float32: exactly what nn.Linear + ForCausalLMLoss's upcast compute.
        logits_CV = F.linear(hidden_CD, weight_VD).to(compute_dtype)
        lse_C = torch.logsumexp(logits_CV, dim=-1)
        target_logit_C = logits_CV.gather(1, targets_C1)[:, 0]
        loss_sum += torch.where(valid_C, lse_C - target_logit_C, 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # d mean / d logits = (softmax - onehot) / num_valid on valid rows, 0 on ignored ones. Built in place in the
        # logits' memory; scaled before the cast to the model dtype, as autograd through the upcast would.
        grad_logits_CV = logits_CV.sub_(lse_C[:, None]).exp_()
        grad_logits_CV.scatter_add_(1, targets_C1, -torch.ones_like(grad_logits_CV[:, :1]))
        grad_logits_CV.mul_(torch.where(valid_C, 1.0 / num_valid, 0.0)[:, None])
        grad_logits_CV = grad_logits_CV.to(hidden_ND.dtype)
        if grad_hidden is not None:
            torch.mm(grad_logits_CV, weight_VD, out=grad_hidden[rows])
        if grad_weight is not None:
            _accumulate_weight_grad(grad_weight, grad_logits_CV, hidden_CD)
    return loss_sum / num_valid, grad_hidden, grad_weight


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits (HF's upcast), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _accumulate_weight_grad(grad_weight_VD: Tensor, grad_logits_CV: Tensor, hidden_CD: Tensor) -> None:
    """grad_weight_VD (float32+) += grad_logits_CV.T @ hidden_CD, without a [V, D] temporary where torch allows."""
    if grad_logits_CV.dtype == grad_weight_VD.dtype:
        grad_weight_VD.addmm_(grad_logits_CV.t(), hidden_CD)
    elif grad_logits_CV.is_cuda:
        # bf16/fp16 operands accumulated straight into the float32 buffer (torch >= 2.8, CUDA only).
        torch.addmm(grad_weight_VD, grad_logits_CV.t(), hidden_CD, out_dtype=grad_weight_VD.dtype, out=grad_weight_VD)
    else:
        grad_weight_VD += torch.mm(grad_logits_CV.t(), hidden_CD)
