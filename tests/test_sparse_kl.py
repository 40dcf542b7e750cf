"""The sparse stage's loss pieces against `losses.reference` (float64, fresh random inputs).

- the teacher probabilities the sparse attention hands over equal the reference's sparse teacher distribution;
- the gathered multi-layer sparse KL fed with them equals the reference multi-layer KL restricted to the top-k
  set: loss, per-layer KL, entropy and the indexer gradients, with padding, -1 slots, repeated indices and rows
  with fewer than K visible keys.
"""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels import sparse_attention, sparse_attention_probs, visible_slots
from indexcache.losses import IndexerOutputs, SparseGroupKL, TeacherInputs, multi_layer_kl, sparse_multi_layer_kl


def random_topk(batch: int, seq: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Top-k-like indices with everything the kernels must ignore: -1 slots, future keys, repeats."""
    indices = torch.randint(0, seq, (batch, seq, topk), generator=gen)
    rows = torch.arange(seq)[None, :, None]
    indices = torch.where(torch.rand(indices.shape, generator=gen) < 0.7, indices % (rows + 1), indices)
    indices[torch.rand(indices.shape, generator=gen) < 0.15] = -1
    indices[:, :, -1] = indices[:, :, 0]  # a repeated key in every row
    indices[:, :, 1] = torch.arange(seq)[None, :]  # the row itself: most rows see a key
    return indices


def random_group(seed: int, kv_heads: int, padding: bool, num_layers: int = 3):
    gen = torch.Generator().manual_seed(seed)
    batch, seq, topk, heads, dim, idx_heads, idx_dim = 2, 21, 7, 4, 12, 3, 8

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    indexer = IndexerOutputs(
        q=randn(batch, seq, idx_heads, idx_dim), k=randn(batch, seq, idx_dim), w=randn(batch, seq, idx_heads, scale=0.5)
    )
    teachers = [
        TeacherInputs(
            query=torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64) * 1.5,
            key=torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64),
            scaling=dim**-0.5,
        )
        for _ in range(num_layers)
    ]
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding:
        mask[0, :4] = 0
        mask[1, 16:] = 0
    return indexer, teachers, (mask if padding else None), random_topk(batch, seq, topk, gen)


def attention_probs(teacher: TeacherInputs, slots: torch.Tensor) -> torch.Tensor:
    """The teacher as the sparse attention hands it over: LSE from the forward, then the probability pass."""
    query, key = teacher.query.transpose(1, 2), teacher.key.transpose(1, 2)
    _, lse = sparse_attention(query, key, key, slots, teacher.scaling, impl="reference")
    return sparse_attention_probs(query, key, slots, lse, teacher.scaling, impl="reference")


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gathered_sparse_kl_equals_reference(kv_heads: int, padding: bool, chunk_size: int | None):
    indexer, teachers, mask, topk = random_group(kv_heads * 10 + padding + (chunk_size or 0), kv_heads, padding)
    real = None if mask is None else mask.bool()
    slots = visible_slots(topk, real)
    probs = [attention_probs(teacher, slots) for teacher in teachers]
    got = sparse_multi_layer_kl(indexer, probs, mask, topk, chunk_size=chunk_size)
    expected = multi_layer_kl(indexer, teachers, mask, topk, impl="reference")

    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.kl_per_layer, expected.kl_per_layer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.teacher_entropy, expected.teacher_entropy, rtol=1e-10, atol=1e-12)
    assert got.num_rows == expected.num_rows
    assert expected.loss > 1e-3  # a real mismatch between teacher and student to be matched
    params = [indexer.q, indexer.k, indexer.w]
    weight = 0.7  # the incoming gradient is scaled through
    grads = torch.autograd.grad(weight * got.loss, params)
    expected_grads = torch.autograd.grad(weight * expected.loss, params)
    for name, g, e in zip("qkw", grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=f"d{name}")
        assert e.abs().sum() > 0


def test_group_fed_layer_by_layer_keeps_the_callers_tensors_and_counts_layers():
    indexer, teachers, mask, topk = random_group(5, 1, True, num_layers=2)
    real = mask.bool()
    slots = visible_slots(topk, real)
    probs = [attention_probs(teacher, slots) for teacher in teachers]
    before = [p.clone() for p in probs]
    group = SparseGroupKL(indexer, slots, real, num_layers=2)
    group.add_layer(probs[0])
    with pytest.raises(AssertionError, match="serves 2 layers but 1"):
        group.result()
    group.add_layer(probs[1])
    with pytest.raises(AssertionError, match="one more teacher"):
        group.add_layer(probs[1])
    result = group.result()
    assert all(torch.equal(p, b) for p, b in zip(probs, before, strict=True))
    assert result.kl_per_layer.shape == (2,) and not result.kl_per_layer.requires_grad
    with torch.no_grad():
        no_grad = sparse_multi_layer_kl(indexer, probs, mask, topk)
    torch.testing.assert_close(no_grad.loss, result.loss.detach())
