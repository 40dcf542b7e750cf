"""Sparse-stage KL on the top-k set, from teacher probabilities the attention hands over (docs/DESIGN.md section 1).

In the sparse stage every served layer attends to its F layer's top-k set, and the sparse attention gives that
layer's head-averaged probabilities on the set, p_j [B, T, K] (`indexcache.kernels.sparse_attention_probs`). So the
loss never scores teacher keys itself: it gathers the indexer's keys at the K slots and forms the student

    q[t, k] = softmax_k( sum_j w[t, j] * relu(q_idx[t, j] . k_idx[slot[t, k]]) )          over the row's valid slots

in O(T * K * H_I * D_I), forward and backward (nothing of size [T, T]). On CUDA each layer's KL and entropy and the
gradients come from Triton kernels that write nothing of size [B, T, K] (`sparse_fused.py`), elsewhere from the
PyTorch code here (query rows in chunks), which is their reference.

A group is fed layer by layer (`SparseGroupKL.add_layer`): each layer's KL(p_j || q) and entropy H(p_j) are
summed for logging as it runs (the F layer's student is known before its S layers run), and p_j is added to one
running [B, T, K] sum, the only tensor of that size the group keeps. The gradient of (1/G) sum_j KL(p_j || q)
w.r.t. the indexer logits is (q - p_bar) / N, with p_bar the mean of the p_j, so `result()` makes one gradient
pass with p_bar. Normalisation as everywhere: sums over valid rows (real query rows with at least one valid slot),
divided by their number.
"""

from __future__ import annotations

import torch
from torch import Tensor

from indexcache.kernels.config import SparseKLTiling
from indexcache.losses.chunked import PrecomputedGradKL, Sums, exact_tf32, wants_grad
from indexcache.losses.interface import IndexerOutputs, KLResult, compute_dtype, key_mask, visible_slots

__all__ = ["SparseGroupKL", "sparse_multi_layer_kl"]

# Scratch per row chunk: the gathered indexer keys and a few [c, H_I, K] float32 buffers.
CHUNK_BYTES = 512 * 2**20


class SparseGroupKL:
    """One F group's sparse KL, fed each served layer's teacher probabilities in layer order (see module doc).

    Args:
        indexer: the F layer's indexer outputs, with autograd to its parameters.
        slots: [B, T, K] int64 from `visible_slots` (-1: no key), the set every layer of the group attends to.
            Slots name rows of `indexer.k`, which may hold more keys than there are query rows (context
            parallelism: a rank's rows against the gathered keys).
        real: [B, T] bool real query rows (None: no padding).
        num_layers: G, the number of layers the group serves (the F layer first).
        chunk_size: query rows per chunk (None: sized to CHUNK_BYTES).
        num_rows: the normaliser of the row sums (None: the valid rows given; context parallelism: every rank's).
        tiling: the CUDA kernels' step (None: their default).
    """

    def __init__(
        self,
        indexer: IndexerOutputs,
        slots: Tensor,
        real: Tensor | None,
        num_layers: int,
        chunk_size: int | None = None,
        num_rows: int | None = None,
        tiling: SparseKLTiling | None = None,
    ) -> None:
        batch, seq = indexer.q.shape[:2]
        if tuple(slots.shape[:2]) != (batch, seq) or slots.dtype != torch.long:
            raise ValueError(
                f"slots must be int64 [B={batch}, T={seq}, K] from visible_slots, got {tuple(slots.shape)}"
            )
        self.indexer, self.slots, self.num_layers = indexer, slots, num_layers
        self.dtype = compute_dtype(indexer.q.dtype)
        self.rows = key_mask(real, batch, seq, slots.device) & (slots >= 0).any(dim=-1)
        self.num_rows = int(self.rows.sum()) if num_rows is None else num_rows
        self.fused = _fused_usable(indexer)
        self.tiling = tiling or SparseKLTiling()
        if chunk_size is None:  # the PyTorch path: gathered keys and [c, H_I, K] scores per row (the kernels: none)
            per_row = 4 * slots.shape[-1] * (indexer.k.shape[-1] + 3 * indexer.q.shape[2])
            chunk_size = max(1, CHUNK_BYTES // max(batch * per_row, 1))
        self.chunk_size = chunk_size
        # The kernels' record of each row's student log-sum-exp over its slots, [B, T] (the student is fixed during
        # the forward): the gradient pass reuses it.
        self._lse: Tensor | None = None
        self._p_sum: Tensor | None = None
        self._kl: list[Tensor] = []
        self._entropy: list[Tensor] = []

    def add_layer(self, probs: Tensor) -> None:
        """Add one served layer's teacher p_j [B, T, K] (rows summing to 1 on their valid slots, 0 elsewhere)."""
        if len(self._kl) == self.num_layers:
            raise AssertionError(f"the group serves {self.num_layers} layers; got one more teacher")
        if probs.shape != self.slots.shape:
            raise ValueError(
                f"teacher probabilities must be [B, T, K]={tuple(self.slots.shape)}, got {tuple(probs.shape)}"
            )
        probs = probs.detach().to(self.dtype)
        kl, entropy = self._layer_sums(probs)
        self._kl.append(kl)
        self._entropy.append(entropy)
        # The running sum is the group's one [B, T, K] buffer (a copy of the first layer's: callers keep theirs).
        self._p_sum = probs.clone() if self._p_sum is None else self._p_sum.add_(probs)

    def result(self) -> KLResult:
        """The group's loss (gradient to the indexer through p_bar), per-layer KL and entropy; after every layer."""
        if len(self._kl) != self.num_layers:
            raise AssertionError(f"the group serves {self.num_layers} layers but {len(self._kl)} teachers came")
        p_bar = self._p_sum.div_(self.num_layers)
        self._p_sum = None
        kl, entropy = torch.stack(self._kl), torch.stack(self._entropy)
        want_grad = wants_grad(self.indexer)

        def compute() -> Sums:
            grads = self._gradients(p_bar) if want_grad else (None, None, None)
            return Sums(kl=kl, entropy=entropy, num_rows=self.num_rows, dq=grads[0], dk=grads[1], dw=grads[2])

        loss, kl_per_layer, teacher_entropy = PrecomputedGradKL.apply(
            self.indexer.q, self.indexer.k, self.indexer.w, compute
        )
        return KLResult(loss=loss, kl_per_layer=kl_per_layer, teacher_entropy=teacher_entropy, num_rows=self.num_rows)

    # ---- internals ----------------------------------------------------------------------------------------------
    def _chunks(self) -> range:
        return range(0, self.slots.shape[1], self.chunk_size)

    def _student(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One chunk's gathered indexer keys [B, c, K, D_I], relu scores [B, c, H_I, K], log q [B, c, K] (0 off the
        set) and the valid-slot mask."""
        q, k, w = self.indexer.q.detach(), self.indexer.k.detach(), self.indexer.w.detach()
        slots = self.slots[:, start:stop]
        batch = slots.shape[0]
        keys = k[torch.arange(batch, device=slots.device)[:, None], slots.clamp_min(0).reshape(batch, -1)]
        keys = keys.view(*slots.shape, -1).to(self.dtype)
        with exact_tf32(q.dtype):
            relu_scores = torch.einsum("bcjd,bckd->bcjk", q[:, start:stop].to(self.dtype), keys).clamp_min_(0.0)
        logits = torch.einsum("bcjk,bcj->bck", relu_scores, w[:, start:stop].to(self.dtype))
        valid = slots >= 0
        # Rows without a valid slot get a uniform dummy distribution so nothing is NaN; they carry no weight.
        log_q = logits.masked_fill_(~valid, float("-inf")).masked_fill_(~valid.any(-1, keepdim=True), 0.0)
        log_q = log_q.log_softmax(dim=-1).masked_fill_(~valid, 0.0)
        return keys, relu_scores, log_q, valid

    @torch.no_grad()
    def _layer_sums(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """One layer's KL(p || q) and teacher entropy, summed over the valid rows; records the student's LSE."""
        row_mask = self.rows.to(self.dtype)
        if self.fused:  # one pass per row; no [B, T, K] buffer beside the group's running sum
            from indexcache.losses.sparse_fused import student_layer_stats

            q, k, w = self.indexer.q.detach(), self.indexer.k.detach(), self.indexer.w.detach()
            kl_rows, entropy_rows, self._lse = student_layer_stats(q, k, w, self.slots, probs, self.tiling)
            return (kl_rows * row_mask).sum(), (entropy_rows * row_mask).sum()
        kl = torch.zeros((), dtype=self.dtype, device=probs.device)
        entropy = torch.zeros((), dtype=self.dtype, device=probs.device)
        for start in self._chunks():
            stop = min(start + self.chunk_size, probs.shape[1])
            log_q = self._student(start, stop)[2]
            p = probs[:, start:stop]
            p_log_p = torch.xlogy(p, p)
            kl += ((p_log_p - p * log_q).sum(-1) * row_mask[:, start:stop]).sum()
            entropy -= (p_log_p.sum(-1) * row_mask[:, start:stop]).sum()
        return kl, entropy

    @torch.no_grad()
    def _gradients(self, p_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dq, dk, dw of (1/N) sum_rows KL(p_bar || q): d logits = (q - p_bar) / N on valid rows' valid slots."""
        q, k, w = self.indexer.q, self.indexer.k, self.indexer.w
        batch, seq = self.slots.shape[:2]
        if self.fused:  # the LSE was recorded by the layers' passes (`_layer_sums`)
            from indexcache.losses.sparse_fused import student_gradients

            row_weight = self.rows.float() / max(self.num_rows, 1)
            return student_gradients(
                q.detach(), k.detach(), w.detach(), self.slots, self._lse, p_bar, row_weight, self.tiling
            )
        dq = torch.zeros(q.shape, dtype=self.dtype, device=q.device)
        dw = torch.zeros(w.shape, dtype=self.dtype, device=q.device)
        num_keys = k.shape[1]
        dk_flat = torch.zeros(batch * num_keys, k.shape[-1], dtype=self.dtype, device=q.device)
        batch_offset = torch.arange(batch, device=q.device)[:, None, None] * num_keys
        for start in self._chunks():
            stop = min(start + self.chunk_size, seq)
            keys, relu_scores, log_q, valid = self._student(start, stop)
            row_weight = self.rows[:, start:stop].to(self.dtype) / max(self.num_rows, 1)
            d_logits = (log_q.exp_().masked_fill_(~valid, 0.0) - p_bar[:, start:stop]) * row_weight[..., None]
            w_chunk = w[:, start:stop].detach().to(self.dtype)
            dw[:, start:stop] = torch.einsum("bck,bcjk->bcj", d_logits, relu_scores)
            d_scores = (relu_scores > 0).to(self.dtype).mul_(d_logits[:, :, None]).mul_(w_chunk[..., None])
            dq[:, start:stop] = torch.einsum("bcjk,bckd->bcjd", d_scores, keys)
            d_keys = torch.einsum("bcjk,bcjd->bckd", d_scores, q[:, start:stop].detach().to(self.dtype))
            flat = (batch_offset + self.slots[:, start:stop].clamp_min(0)).reshape(-1)
            dk_flat.index_add_(0, flat, d_keys.reshape(-1, k.shape[-1]))
        return dq, dk_flat.view(k.shape), dw


def _fused_usable(indexer: IndexerOutputs) -> bool:
    if not indexer.q.is_cuda:
        return False
    try:
        from indexcache.losses.sparse_fused import fused_sparse_kl_supports
    except ImportError:  # no triton on this machine
        return False
    return fused_sparse_kl_supports(indexer.q, indexer.k, indexer.w)


def sparse_multi_layer_kl(
    indexer: IndexerOutputs,
    teacher_probs: list[Tensor],
    attention_mask: Tensor | None,
    topk_indices: Tensor,
    chunk_size: int | None = None,
) -> KLResult:
    """The sparse multi-layer KL of one group from its layers' teacher probabilities on the top-k slots.

    `teacher_probs[j]` [B, T, K] are served layer j's head-averaged probabilities on `visible_slots(topk_indices,
    attention_mask)`, slot by slot (the F layer first). Equals `multi_layer_kl(..., topk_indices)` with the teachers
    whose probabilities these are (tests/test_sparse_kl.py).
    """
    real = None if attention_mask is None else attention_mask.bool()
    slots = visible_slots(topk_indices, real)
    group = SparseGroupKL(indexer, slots, real, len(teacher_probs), chunk_size)
    for probs in teacher_probs:
        group.add_layer(probs)
    return group.result()
