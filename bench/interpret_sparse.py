"""The sparse-attention Triton kernels on CPU through Triton's interpreter, against the float64 reference.

    TRITON_INTERPRET=1 python bench/interpret_sparse.py

Small shapes covering the MLA latent form (value = the key's leading columns, one KV head, a 2-part width),
GQA with several head blocks (the teacher pass then adds head blocks with atomics), a value split over two
programs, padding, -1 slots and repeated indices. Exits non-zero naming the first case that disagrees.
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


def main() -> None:
    check("mla_latent", heads=20, kv_heads=1, dim=48, value_dim=32, latent=True, block_value=32)
    check("mla_value_split", heads=8, kv_heads=1, dim=48, value_dim=32, latent=True, block_value=16)
    check("gqa", heads=6, kv_heads=2, dim=16, value_dim=16, latent=False, block_value=64)
    check("odd_width", heads=4, kv_heads=1, dim=24, value_dim=20, latent=False, block_value=64)
    print("all cases agree")


if __name__ == "__main__":
    main()
