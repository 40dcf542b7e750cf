"""Numerical trouble the loss must survive: all-padding sequences, rows with no visible key, huge scores.

Each case compares with the float64 reference on the rows that carry a loss, and demands finite gradients
everywhere (a NaN in one row would reach every parameter through the optimizer).
"""

from __future__ import annotations

import torch

from indexcache.kernels import sparse_attention, sparse_attention_probs, visible_slots
from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl
from indexcache.losses.reference import reference_multi_layer_kl
from indexcache.losses.sparse import sparse_multi_layer_kl

BATCH, SEQ, IDX_HEADS, IDX_DIM, HEADS, HEAD_DIM = 2, 12, 3, 8, 4, 16


def _inputs(seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    indexer = IndexerOutputs(
        randn(BATCH, SEQ, IDX_HEADS, IDX_DIM, s=scale).requires_grad_(),
        randn(BATCH, SEQ, IDX_DIM, s=scale).requires_grad_(),
        randn(BATCH, SEQ, IDX_HEADS, s=0.5).requires_grad_(),
    )
    teachers = [
        TeacherInputs(randn(BATCH, HEADS, SEQ, HEAD_DIM), randn(BATCH, HEADS, SEQ, HEAD_DIM), HEAD_DIM**-0.5)
        for _ in range(2)
    ]
    return indexer, teachers


def _grads(result, indexer: IndexerOutputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(result.loss, [indexer.q, indexer.k, indexer.w]))


def test_an_all_padding_sequence_carries_no_loss_and_no_gradient():
    indexer, teachers = _inputs(seed=1)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1] = 0  # the second sequence is padding from end to end
    got = multi_layer_kl(indexer, teachers, mask, impl="chunked", chunk_size=5)
    grads = _grads(got, indexer)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g[1].abs().max() == 0 for g in grads), "padding rows pass no gradient"
    # The loss is the mean over the real rows only: the first sequence on its own.
    alone = IndexerOutputs(*(x[:1].detach() for x in (indexer.q, indexer.k, indexer.w)))
    solo = [TeacherInputs(t.query[:1], t.key[:1], t.scaling) for t in teachers]
    want = reference_multi_layer_kl(alone, solo, mask[:1])
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=0)


def test_rows_with_no_visible_key_in_their_top_k_set_are_finite():
    indexer, teachers = _inputs(seed=2)
    topk = torch.randint(0, SEQ, (BATCH, SEQ, 4), generator=torch.Generator().manual_seed(3))
    topk = torch.minimum(topk, torch.arange(SEQ)[None, :, None])  # causal
    topk[0, 5:8] = -1  # three rows whose set holds no key at all
    got = multi_layer_kl(indexer, teachers, None, topk, impl="chunked", chunk_size=4)
    grads = _grads(got, indexer)
    assert torch.isfinite(got.loss) and all(torch.isfinite(g).all() for g in grads)
    detached = IndexerOutputs(*(x.detach() for x in (indexer.q, indexer.k, indexer.w)))
    want = reference_multi_layer_kl(detached, teachers, None, topk)
    torch.testing.assert_close(got.loss.detach(), want.loss, rtol=1e-10, atol=1e-12)
    # The sparse stage's own path (teacher probabilities handed over by the attention) agrees.
    slots = visible_slots(topk, None)
    probs = []
    for t in teachers:
        query, key = t.query.transpose(1, 2), t.key.transpose(1, 2)
        _, lse = sparse_attention(query, key, key, slots, t.scaling, impl="reference")
        probs.append(sparse_attention_probs(query, key, slots, lse, t.scaling, impl="reference"))
    sparse = sparse_multi_layer_kl(detached, probs, None, topk)
    assert torch.isfinite(sparse.loss)
    torch.testing.assert_close(sparse.loss, want.loss, rtol=1e-8, atol=1e-10)


def test_indexer_scores_beyond_the_bf16_range_stay_finite():
    """Scores of ~1e38 per head overflow bf16 when summed in it; the loss accumulates in float32 and stays exact."""
    indexer, teachers = _inputs(seed=4, dtype=torch.bfloat16, scale=3e9)
    teachers = [TeacherInputs(t.query.float(), t.key.float(), t.scaling) for t in teachers]
    scores = torch.einsum("bthd,bsd->bths", indexer.q.float(), indexer.k.float())
    assert scores.abs().max() > 1e19, "the case must really be out of range for a bf16 dot product's square"
    got = multi_layer_kl(indexer, teachers, None, impl="chunked", chunk_size=5)
    grads = _grads(got, indexer)
    assert torch.isfinite(got.loss) and all(torch.isfinite(g).all() for g in grads)
    as64 = IndexerOutputs(*(x.detach().double() for x in (indexer.q, indexer.k, indexer.w)))
    want = reference_multi_layer_kl(
        as64, [TeacherInputs(t.query.double(), t.key.double(), t.scaling) for t in teachers], None
    )
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-3, atol=1e-3)
