"""The sparse-attention Triton kernels on CPU through Triton's interpreter, against the float64 reference.

    TRITON_INTERPRET=1 python bench/interpret_sparse.py

Small shapes covering the MLA latent form (value = the key's leading columns, one KV head, a 2-part width),
GQA with several head blocks (the teacher pass then adds head blocks with atomics), a value split over two
programs, padding, -1 slots and repeated indices; and the sparse KL's kernels (per-layer KL, entropy and student
LSE; gradients with atomic dk) against the PyTorch path of `SparseGroupKL`. Exits non-zero naming the first case
that disagrees.
tests/test_sparse_attention.py runs it when it can; tests/test_sparse_gpu.py checks the compiled kernels.
"""

from __future__ import annotations

import dataclasses
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels must be built for the interpreter when they are imported)")

import torch

from indexcache.kernels import sparse_attention, sparse_attention_probs, triton_sparse, visible_slots
from indexcache.losses import IndexerOutputs, SparseGroupKL, sparse_fused

BOUND = 1e-5  # float32 inputs, float32 accumulation, against float64


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "infinities differ"
    a, e = actual[finite].double(), expected[finite].double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def check(name: str, heads: int, kv_heads: int, dim: int, value_dim: int, latent: bool, block_value: int) -> None:
    gen = torch.Generator().manual_seed(len(name))
    batch, seq, topk = 2, 37, 9
    query = torch.randn(batch, seq, heads, dim, generator=gen)
    key = torch.randn(batch, seq, kv_heads, dim, generator=gen)
    value = key[..., :value_dim] if latent else torch.randn(batch, seq, kv_heads, value_dim, generator=gen)
    real = torch.ones(batch, seq, dtype=torch.bool)
    real[0, :4] = False
    real[1, 30:] = False
    indices = torch.randint(0, seq, (batch, seq, topk), generator=gen) % (torch.arange(seq)[None, :, None] + 1)
    indices[torch.rand(indices.shape, generator=gen) < 0.2] = -1
    indices[:, :, -1] = indices[:, :, 0]
    slots = visible_slots(indices, real)
    scaling = dim**-0.5
    cfg = dataclasses.replace(triton_sparse.CONFIG, block_heads=16, block_slots=16, block_value=block_value)
    out, lse = triton_sparse.triton_sparse_forward(query, key, value, slots, scaling, cfg)
    ref_out, ref_lse = sparse_attention(query.double(), key.double(), value.double(), slots, scaling, impl="reference")
    probs = triton_sparse.triton_sparse_probs(query, key, slots, lse, scaling, cfg)
    ref_probs = sparse_attention_probs(query.double(), key.double(), slots, ref_lse, scaling, impl="reference")
    errors = {"out": rel(out, ref_out), "lse": rel(lse, ref_lse), "probs": rel(probs, ref_probs)}
    worst = max(errors.values())
    print(f"{name:24s} " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if not worst < BOUND:
        sys.exit(f"case {name} disagrees: {errors}")


def check_kl(name: str, idx_heads: int, idx_dim: int) -> None:
    """The sparse KL kernels (per-layer KL/entropy/LSE, gradients) against the PyTorch path of `SparseGroupKL`."""
    gen = torch.Generator().manual_seed(len(name))
    batch, seq, topk = 2, 29, 7
    q = torch.randn(batch, seq, idx_heads, idx_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seq, idx_dim, generator=gen, dtype=torch.float64)
    w = torch.randn(batch, seq, idx_heads, generator=gen, dtype=torch.float64)
    real = torch.ones(batch, seq, dtype=torch.bool)
    real[0, :3] = False
    indices = torch.randint(0, seq, (batch, seq, topk), generator=gen) % (torch.arange(seq)[None, :, None] + 1)
    indices[torch.rand(indices.shape, generator=gen) < 0.2] = -1
    indices[1, 5] = -1  # a real row without a slot
    slots = visible_slots(indices, real)
    group = SparseGroupKL(IndexerOutputs(q, k, w), slots, real, num_layers=1)
    assert not group.fused  # CPU tensors: the PyTorch path is the reference here
    p = torch.rand(slots.shape, generator=gen, dtype=torch.float64).masked_fill_(slots < 0, 0.0)
    p[0, 7, 0] = 0.0  # a zero probability on a valid slot
    p /= p.sum(-1, keepdim=True).clamp_min(1e-30)
    log_q = group._student(0, seq)[2]
    p_log_p = torch.xlogy(p, p)
    ref_kl, ref_entropy = (p_log_p - p * log_q).sum(-1), -p_log_p.sum(-1)
    keys = k[torch.arange(batch)[:, None], slots.clamp_min(0).flatten(1)].view(batch, seq, topk, idx_dim)
    scores = torch.einsum("btjd,btkd->btjk", q, keys).clamp_min(0)
    logits = torch.einsum("btjk,btj->btk", scores, w).masked_fill(slots < 0, float("-inf"))
    ref_lse = torch.logsumexp(logits, dim=-1)
    ref_grads = group._gradients(p)
    q32, k32, w32 = q.float(), k.float(), w.float()
    kl, entropy, lse = sparse_fused.student_layer_stats(q32, k32, w32, slots, p.float())
    row_weight = group.rows.float() / group.num_rows
    grads = sparse_fused.student_gradients(q32, k32, w32, slots, lse, p.float(), row_weight)
    rows = group.rows
    errors = {"kl": rel(kl[rows], ref_kl[rows]), "entropy": rel(entropy[rows], ref_entropy[rows])}
    errors["lse"] = rel(lse[rows], ref_lse[rows])
    errors.update({f"d{n}": rel(g, e) for n, g, e in zip("qkw", grads, ref_grads, strict=True)})
    print(f"{name:24s} " + " ".join(f"{key} {value:.1e}" for key, value in errors.items()))
    if not max(errors.values()) < BOUND:
        sys.exit(f"case {name} disagrees: {errors}")
    if not (torch.isneginf(lse[~rows]).all() and (kl[~rows] == 0).all()):
        sys.exit(f"case {name}: rows without a slot must have LSE -inf and KL 0")


def check_index_scores(name: str, padding: bool) -> None:
    """The indexer's masked chunk scores (the top-k's input) against the float32 PyTorch scorer."""
    from indexcache.kernels import triton_index
    from indexcache.model.indexer import index_scores

    gen = torch.Generator().manual_seed(len(name))
    batch, seq, heads, dim = 2, 150, 3, 32
    q = torch.randn(batch, seq, heads, dim, generator=gen).half()
    k = torch.randn(batch, seq, dim, generator=gen).half()
    w = torch.randn(batch, seq, heads, generator=gen)
    real = torch.ones(batch, seq, dtype=torch.bool)
    if padding:
        real[0, :7] = False
        real[1, 140:] = False
    for start, stop in ((0, 64), (64, 150), (100, 130)):
        got = triton_index.triton_index_scores(q, k, w, real if padding else None, start, stop)
        expected = index_scores(q[:, start:stop].float(), k[:, :stop].float(), w[:, start:stop])
        visible = (torch.arange(stop)[None, :] <= torch.arange(start, stop)[:, None])[None] & real[:, None, :stop]
        expected = expected.masked_fill(~visible, float("-inf"))
        error = rel(got, expected)
        print(f"{name:24s} rows {start}-{stop} scores {error:.1e}")
        if not error < BOUND:
            sys.exit(f"case {name} rows {start}-{stop} disagrees: {error}")


def main() -> None:
    check("mla_latent", heads=20, kv_heads=1, dim=48, value_dim=32, latent=True, block_value=32)
    check("mla_value_split", heads=8, kv_heads=1, dim=48, value_dim=32, latent=True, block_value=16)
    check("gqa", heads=6, kv_heads=2, dim=16, value_dim=16, latent=False, block_value=64)
    check("odd_width", heads=4, kv_heads=1, dim=24, value_dim=20, latent=False, block_value=64)
    check_index_scores("index_scores", padding=False)
    check_index_scores("index_scores_padded", padding=True)
    check_kl("kl_glm_like", idx_heads=4, idx_dim=32)
    check_kl("kl_many_heads", idx_heads=20, idx_dim=16)
    print("all cases agree")


if __name__ == "__main__":
    main()
