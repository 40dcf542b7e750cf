"""The fused Triton kernels on CPU through Triton's interpreter, against the float64 chunked loss.

    TRITON_INTERPRET=1 python bench/interpret_check.py

For machines without a GPU (needs triton, and numpy < 2.3: the 3.6 interpreter converts 1-element arrays to
Python ints, which numpy 2.3 refuses). Small fp16 shapes with block sizes shrunk to fit them: dense and sparse,
with and without left padding, D/E blocks of unequal row and key sizes, several row chunks, head slabs, and no
gradients. Exits non-zero naming the first case that disagrees. tests/test_losses_interpret.py runs it when it
can; the GPU tests (tests/test_losses_gpu.py) remain the check of the compiled kernels.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels must be built for the interpreter when fused.py is imported)")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexcache.losses import IndexerOutputs, TeacherInputs, fused
from indexcache.losses.chunked import chunked_multi_layer_kl
from indexcache.losses.interface import key_mask, valid_rows

VALUE_BOUND, GRAD_BOUND = 1e-5, 2e-3  # fp16 inputs, float32 accumulation, against float64


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def report(name: str, errors: dict[str, float]) -> None:
    """Print a case's relative errors; exit naming it when one is over its bound."""
    print(f"{name:<28}", "  ".join(f"{key} {value:.1e}" for key, value in errors.items()), flush=True)
    bad = {key: value for key, value in errors.items() if value > (VALUE_BOUND if key == "kl" else GRAD_BOUND)}
    if bad:
        sys.exit(f"{name}: fused disagrees with the float64 chunked loss: {bad}")


def fp16_randn(gen: torch.Generator):
    """Gaussian fp16 tensors of a shape and scale, from `gen`."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).half()

    return randn


def check(name: str, cfg: fused.FusedConfig, padding: bool, sparse: bool, want_grad: bool = True) -> None:
    gen = torch.Generator().manual_seed(len(name))
    batch, seq, idx_heads, idx_dim, heads, kv_heads, head_dim, layers = 2, 200, 4, 32, 4, 2, 64, 2
    randn = fp16_randn(gen)

    q, k, w = (
        randn(batch, seq, idx_heads, idx_dim, scale=0.3),
        randn(batch, seq, idx_dim, scale=0.3),
        randn(batch, seq, idx_heads, scale=0.5),
    )
    teachers = [
        TeacherInputs(randn(batch, heads, seq, head_dim, scale=1.5), randn(batch, kv_heads, seq, head_dim, scale=1.5),
                      head_dim**-0.5)
        for _ in range(layers)
    ]  # fmt: skip
    mask = None
    if padding:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :30] = 0
    topk = torch.randint(-1, seq, (batch, seq, 24), generator=gen) if sparse else None
    real = key_mask(mask, batch, seq, q.device)
    rows = valid_rows(real, topk)
    num_rows = int(rows.sum())
    sums = fused.fused_sums(IndexerOutputs(q, k, w), teachers, real, rows, num_rows, topk, want_grad, padding, cfg)
    indexer64 = IndexerOutputs(*(x.double().requires_grad_() for x in (q, k, w)))
    teachers64 = [TeacherInputs(t.query.double(), t.key.double(), t.scaling) for t in teachers]
    expected = chunked_multi_layer_kl(indexer64, teachers64, mask, topk, 64)
    errors = {"kl": rel(sums.kl / num_rows, expected.kl_per_layer)}
    if want_grad:
        grads = torch.autograd.grad(expected.loss, (indexer64.q, indexer64.k, indexer64.w))
        errors.update({f"d{n}": rel(g, e) for n, g, e in zip("qkw", (sums.dq, sums.dk, sums.dw), grads, strict=True)})
    report(name, errors)


def check_offset(name: str, cfg: fused.FusedConfig, query_offset: int) -> None:
    """Rows from `query_offset` on against every key before and among them (context parallelism), teachers with
    their attention's LSE: against the float64 chunked loss with the same offset."""
    gen = torch.Generator().manual_seed(len(name))
    batch, seq, idx_heads, idx_dim, heads, kv_heads, head_dim, layers = 2, 200, 4, 32, 4, 2, 64, 2
    rows = seq - query_offset
    randn = fp16_randn(gen)

    q, k, w = (
        randn(batch, rows, idx_heads, idx_dim, scale=0.3),
        randn(batch, seq, idx_dim, scale=0.3),
        randn(batch, rows, idx_heads, scale=0.5),
    )
    causal = torch.arange(seq)[None, :] <= torch.arange(query_offset, seq)[:, None]
    teachers = []
    for _ in range(layers):
        query, key = randn(batch, heads, rows, head_dim, scale=1.5), randn(batch, kv_heads, seq, head_dim, scale=1.5)
        scores = query.double() @ key.double().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)
        lse = (scores * head_dim**-0.5).masked_fill(~causal, float("-inf")).logsumexp(-1).float()
        teachers.append(TeacherInputs(query, key, head_dim**-0.5, lse))
    real = torch.ones(batch, seq, dtype=torch.bool)
    num_rows = batch * seq  # the global count: this chunk's share of the loss
    sums = fused.fused_sums(
        IndexerOutputs(q, k, w), teachers, real, real[:, query_offset:], num_rows, None, True, False, cfg,
        query_offset=query_offset,
    )  # fmt: skip
    indexer64 = IndexerOutputs(*(x.double().requires_grad_() for x in (q, k, w)))
    teachers64 = [TeacherInputs(t.query.double(), t.key.double(), t.scaling) for t in teachers]
    expected = chunked_multi_layer_kl(indexer64, teachers64, None, None, 64, query_offset, num_rows)
    grads = torch.autograd.grad(expected.loss, (indexer64.q, indexer64.k, indexer64.w))
    errors = {"kl": rel(sums.kl / num_rows, expected.kl_per_layer)}
    errors.update({f"d{n}": rel(g, e) for n, g, e in zip("qkw", (sums.dq, sums.dk, sums.dw), grads, strict=True)})
    report(name, errors)


def main() -> None:
    small = fused.FusedConfig(
        tile_rows=64, tile_cols=64, lse_rows=64, lse_cols=64, tile_depth=32,
        dq_rows=32, dq_cols=16, dk_rows=16, dk_cols=32, scratch_bytes=2 * 4 * 2 * 256 * 64 * 2,
    )  # fmt: skip
    for padding in (False, True):
        for sparse in (False, True):
            check(f"padding={padding} sparse={sparse}", small, padding, sparse)
    swapped = dataclasses.replace(small, dq_rows=16, dq_cols=32, dk_rows=32, dk_cols=16)
    check("D/E blocks swapped", swapped, padding=True, sparse=False)
    check("head slabs of 3", dataclasses.replace(small, heads_per_launch=3), padding=False, sparse=True)
    check("no gradients", small, padding=True, sparse=True, want_grad=False)
    check_offset("query offset 64", small, 64)
    check_offset("query offset 128, 2 chunks", dataclasses.replace(small, scratch_bytes=2 * 4 * 2 * 256 * 32), 128)
    print("all cases agree")


if __name__ == "__main__":
    main()
