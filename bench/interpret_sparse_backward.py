"""The sparse attention's Triton backward on CPU through Triton's interpreter, against the PyTorch reference.

    TRITON_INTERPRET=1 python bench/interpret_sparse_backward.py

Small float32 shapes: the MLA latent form with a 2-part width (D = 72 = 64 + 8, value = key[..., :64], its
gradient added into the key's buffer), a latent value that is not a whole key tile (D = 24 = 16 + 8, value =
key[..., :20]: separate dV, autograd adds it), the model's latent width (D = 576 = 512 + 64, value 512: through
autograd the wide rows' block shapes), GQA with a separate value, and an odd value width; several head
blocks (atomics from two programs onto one key row), a partial last slot block, -1 slots, and rows with no slot
(padding keys, and one row cleared) whose d_out is not zero. Each case compares, by relative L2 error:
- `triton_sparse_backward` against `_reference_backward` on the same output and LSE (the reference forward's);
- `sparse_attention(impl="triton")` against `impl="reference"` through autograd, on leaf query/key (and value
  where it is not a view of the key): the wiring, the saved LSE and the latent view's gradient;
and that the rows with no slot have exactly zero dQ and every gradient is finite. Bound 1e-5: float32 inputs and
float32 accumulation on both sides, so only the summation order differs. Exits non-zero naming the first case
that disagrees. tests/test_sparse_backward_interpret.py runs it; tests/test_sparse_gpu.py checks the compiled kernel.
"""

from __future__ import annotations

import dataclasses
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels must be built for the interpreter when they are imported)")

import torch
from torch import Tensor

from indexcache.kernels import sparse_attention, triton_sparse, visible_slots
from indexcache.kernels.sparse_attention import _reference_backward, _reference_forward

BOUND = 1e-5


def rel(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def check(
    name: str, heads: int, kv_heads: int, dim: int, value_dim: int, latent: bool, topk: int, rows_from: int = 0
) -> None:
    """`rows_from` > 0: only the rows from there on query, against every key (a context-parallel rank's rows against
    the gathered keys: more keys than query rows)."""
    gen = torch.Generator().manual_seed(len(name) * 1000 + dim)
    batch, seq = 2, 37
    query = torch.randn(batch, seq, heads, dim, generator=gen)
    key = torch.randn(batch, seq, kv_heads, dim, generator=gen)
    own_value = torch.randn(batch, seq, kv_heads, value_dim, generator=gen)
    real = torch.ones(batch, seq, dtype=torch.bool)
    real[0, :4] = False  # rows 0-3 of sequence 0 see only padding keys: no slot at all
    indices = torch.randint(0, seq, (batch, seq, topk), generator=gen) % (torch.arange(seq)[None, :, None] + 1)
    indices[torch.rand(indices.shape, generator=gen) < 0.2] = -1
    slots = visible_slots(indices, real)
    slots[1, max(10, rows_from + 3)] = -1  # a row cleared in the middle of a sequence
    d_out = torch.randn(batch, seq, heads, value_dim, generator=gen)
    query, slots, d_out = query[:, rows_from:], slots[:, rows_from:], d_out[:, rows_from:]
    scaling = dim**-0.5
    cfg = dataclasses.replace(triton_sparse.BACKWARD_CONFIG, block_heads=16, block_slots=16)

    def value_of(k: Tensor) -> Tensor:
        return k[..., :value_dim] if latent else own_value

    # The kernel against the reference backward, on the reference forward's output and LSE.
    out, lse = _reference_forward(query, key, value_of(key), slots, scaling, rows_per_chunk=8)
    expected = _reference_backward(
        query, key, value_of(key), slots, out, d_out, scaling, rows_per_chunk=8, needs=(True, True, True)
    )
    got = triton_sparse.triton_sparse_backward(
        query, key, value_of(key), slots, out, d_out, lse, scaling, value_into_key=latent, cfg=cfg
    )
    ref_dq, ref_dk, ref_dv = expected
    if got[2] is None:  # the value's gradient went into the key's leading columns
        ref_dk = ref_dk.clone()
        ref_dk[..., :value_dim] += ref_dv
        errors = {"dq": rel(got[0], ref_dq), "dk+dv": rel(got[1], ref_dk)}
    else:
        errors = {"dq": rel(got[0], ref_dq), "dk": rel(got[1], ref_dk), "dv": rel(got[2], ref_dv)}

    # Through autograd: the forward saves its LSE, the backward dispatch, the latent view's gradient.
    def grads(impl: str) -> tuple[Tensor, ...]:
        leaves = [query.clone().requires_grad_(), key.clone().requires_grad_()]
        if not latent:
            leaves.append(own_value.clone().requires_grad_())
        value = leaves[1][..., :value_dim] if latent else leaves[2]
        result, _ = sparse_attention(leaves[0], leaves[1], value, slots, scaling, impl=impl)
        return torch.autograd.grad(result, leaves, d_out)

    for label, g, e in zip("qkv", grads("triton"), grads("reference"), strict=False):
        errors[f"autograd d{label}"] = rel(g, e)
    print(f"{name:24s} " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    empty = torch.isneginf(lse)
    if not empty.any(-1).any():
        sys.exit(f"case {name}: no row without slots (the test lost its -inf rows)")
    if not all(torch.isfinite(x).all() for x in got if x is not None):
        sys.exit(f"case {name}: a gradient is not finite")
    if got[0][empty].abs().max() != 0:
        sys.exit(f"case {name}: a row with no slot has a non-zero dQ")
    if not max(errors.values()) < BOUND:
        sys.exit(f"case {name} disagrees: {errors}")


def main() -> None:
    check("latent_d72", heads=20, kv_heads=1, dim=72, value_dim=64, latent=True, topk=24)
    # The MLA latent width: through autograd it takes WIDE_BACKWARD_CONFIG (32 heads: two head blocks, 16-slot steps).
    check("latent_d576", heads=40, kv_heads=1, dim=576, value_dim=512, latent=True, topk=24)
    check("latent_value_not_tile", heads=4, kv_heads=1, dim=24, value_dim=20, latent=True, topk=9)
    check("gqa", heads=6, kv_heads=2, dim=32, value_dim=32, latent=False, topk=12)
    check("odd_value_width", heads=4, kv_heads=1, dim=24, value_dim=20, latent=False, topk=9)
    check("latent_gathered_keys", heads=20, kv_heads=1, dim=72, value_dim=64, latent=True, topk=24, rows_from=17)
    check("gqa_gathered_keys", heads=6, kv_heads=2, dim=32, value_dim=32, latent=False, topk=12, rows_from=17)
    print("all cases agree")


if __name__ == "__main__":
    main()
