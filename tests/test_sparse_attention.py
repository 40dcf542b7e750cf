"""Gather-based sparse attention against a materialising float64 reference of the same maths.

The reference attends through a dense [B, H, T, T] score matrix masked to each row's top-k set (a set: repeated
indices count once; -1, future and padding keys are dropped), which is what the stock models compute with their
top-k mask. Fresh random inputs for every case; gradients by autograd through the reference.
"""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels import sparse_attention, sparse_attention_probs, visible_slots
from indexcache.losses.interface import TeacherInputs
from indexcache.losses.reference import allowed_keys, teacher_distribution


def random_topk(batch: int, seq: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Top-k-like indices with everything the kernels must ignore: -1 slots, future keys, repeats."""
    indices = torch.randint(0, seq, (batch, seq, topk), generator=gen)
    rows = torch.arange(seq)[None, :, None]
    indices = torch.where(torch.rand(indices.shape, generator=gen) < 0.7, indices % (rows + 1), indices)
    indices[torch.rand(indices.shape, generator=gen) < 0.15] = -1
    indices[:, :, -1] = indices[:, :, 0]  # a repeated key in every row
    indices[:, :, 1] = torch.arange(seq)[None, :]  # the row itself: most rows see a key
    return indices


def dense_reference(query, key, value, allowed, scaling):
    """[B, T, H, D_v] output and [B, T, H] LSE over allowed keys ([B, T, S] bool), float64, materialising."""
    heads, kv_heads = query.shape[2], key.shape[2]
    k = key.repeat_interleave(heads // kv_heads, dim=2)
    v = value.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", query, k) * scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(allowed[:, None], (scores - lse.nan_to_num(neginf=0.0)[..., None]).exp(), 0.0)
    out = torch.einsum("bhts,bshv->bthv", probs, v)
    return out, lse.transpose(1, 2)


CASES = {
    # name: (heads, kv_heads, dim, value_dim, value is the key's first columns (MLA latent form))
    "mla_latent": (4, 1, 24, 16, True),
    "gqa": (6, 2, 16, 8, False),
    "mha": (3, 3, 8, 12, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_sparse_attention_equals_masked_dense_attention(case: str, padding: bool, chunk_size: int | None):
    heads, kv_heads, dim, value_dim, latent = CASES[case]
    gen = torch.Generator().manual_seed(hash((case, padding, chunk_size)) % 2**31)
    batch, seq, topk = 2, 19, 6
    query = torch.randn(batch, seq, heads, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, seq, kv_heads, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    own_value = torch.randn(batch, seq, kv_heads, value_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    value = key[..., :value_dim] if latent else own_value
    real = torch.ones(batch, seq, dtype=torch.bool)
    if padding:
        real[0, :3] = False  # left padding: rows 0-2 of batch 0 see no key at all
        real[1, 15:] = False  # right padding
    indices = random_topk(batch, seq, topk, gen)
    slots = visible_slots(indices, real)
    scaling = dim**-0.5

    out, lse = sparse_attention(query, key, value, slots, scaling, impl="reference", chunk_size=chunk_size)
    allowed = allowed_keys(real, indices)
    expected_out, expected_lse = dense_reference(query, key, value, allowed, scaling)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-12)
    empty = ~allowed.any(-1)
    assert empty.any() == padding  # rows with no key exist exactly when there is left padding
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    fewer = allowed.sum(-1) < topk  # rows with fewer than K visible keys (early rows, -1 slots, repeats)
    assert fewer[~empty].any()

    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, [query, key, own_value], d_out, allow_unused=True)
    expected_grads = torch.autograd.grad(expected_out, [query, key, own_value], d_out, allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)

    probs = sparse_attention_probs(query.detach(), key.detach(), slots, lse, scaling, impl="reference")
    teacher = TeacherInputs(query.detach().transpose(1, 2), key.detach().transpose(1, 2), scaling)
    dense_probs = teacher_distribution(teacher, allowed | empty[..., None], torch.float64)
    # The probabilities sit in their slots: scattering them back gives the dense teacher on non-empty rows.
    scattered = torch.zeros(batch, seq, seq + 1, dtype=torch.float64)
    scattered.scatter_add_(-1, torch.where(slots >= 0, slots, seq), probs)
    torch.testing.assert_close(scattered[..., :seq][~empty], dense_probs[~empty], rtol=1e-10, atol=1e-12)
    assert (probs[slots < 0] == 0).all() and (probs[empty] == 0).all()


def test_visible_slots_drop_future_padding_missing_and_repeated_keys():
    real = torch.tensor([[False, True, True, True, True]])
    indices = torch.tensor([[[0, -1, 0], [1, 0, 1], [2, 3, 1], [1, 3, 1], [4, 4, 2]]])
    expected = torch.tensor([[[-1, -1, -1], [1, -1, -1], [2, -1, 1], [1, 3, -1], [4, -1, 2]]])
    assert torch.equal(visible_slots(indices, real), expected)
    assert torch.equal(visible_slots(indices.int(), None)[0, 0], torch.tensor([0, -1, -1]))


def test_sparse_attention_rejects_shapes_it_cannot_read():
    query = torch.randn(1, 4, 3, 8)
    key = torch.randn(1, 4, 2, 8)
    slots = torch.zeros(1, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="not a multiple"):
        sparse_attention(query, key, key, slots, 1.0)
    with pytest.raises(ValueError, match="visible_slots"):
        sparse_attention(query, key[:, :, :1], key[:, :, :1], slots.int(), 1.0)
