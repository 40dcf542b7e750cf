"""The context-parallel pieces as the GPU runs them (compiled kernels, bf16), against the whole sequence.

A CP rank's chunk of rows at global positions g .. g + C - 1 against the keys 0 .. g + C - 1: the dense attention
through flash or cuDNN (merged by LSE), the Triton top-k scorer, and the fused dense KL with its query offset.
Skipped without a GPU; the CPU tests (tests/test_context_parallel.py) cover the same maths in float32/float64.
"""

from __future__ import annotations

import pytest
import torch

from indexcache.kernels.dense_attention import causal_attention_with_lse, offset_causal_attention_with_lse
from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl
from indexcache.model.indexer import select_topk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
def test_offset_dense_attention_equals_the_rows_of_whole_causal_attention(kernel: str):
    torch.manual_seed(0)
    seq, heads, dim = 4096, 8, 128
    query, key, value = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    whole_out, whole_lse = causal_attention_with_lse(query, key, value, dim**-0.5, 0.0, kernel)
    for start, stop in ((0, 1024), (1024, 2048), (3072, 4096)):
        out, lse = offset_causal_attention_with_lse(
            query[:, :, start:stop], key[:, :, :stop], value[:, :, :stop], dim**-0.5, start, kernel
        )
        assert rel(out, whole_out[:, :, start:stop]) < 1e-2
        torch.testing.assert_close(lse, whole_lse[:, :, start:stop].float(), rtol=1e-3, atol=1e-3)


def test_offset_topk_on_the_triton_scorer_equals_the_rows_of_the_whole_sequence():
    torch.manual_seed(1)
    seq, heads, dim, topk = 8192, 16, 128, 512
    q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1, seq, heads, device="cuda")
    whole = select_topk(q, k, w, None, topk)
    for start, stop in ((2048, 4096), (6144, 8192)):
        part = select_topk(q[:, start:stop], k[:, :stop], w[:, start:stop], None, topk, query_offset=start)
        assert torch.equal(part.sort(-1).values, whole[:, start:stop].sort(-1).values)


def test_fused_dense_kl_with_a_query_offset_equals_the_chunked_loss():
    torch.manual_seed(2)
    seq, start, idx_heads, idx_dim, heads, head_dim = 2048, 1024, 8, 64, 8, 128
    rows = seq - start
    q = (torch.randn(1, rows, idx_heads, idx_dim, device="cuda") * 0.3).bfloat16().requires_grad_()
    k = (torch.randn(1, seq, idx_dim, device="cuda") * 0.3).bfloat16().requires_grad_()
    w = torch.rand(1, rows, idx_heads, device="cuda").requires_grad_()
    teachers = []
    for _ in range(2):
        query = torch.randn(1, heads, rows, head_dim, device="cuda", dtype=torch.bfloat16)
        key = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
        value = torch.zeros_like(key)
        _, lse = offset_causal_attention_with_lse(query, key, value, head_dim**-0.5, start)
        teachers.append(TeacherInputs(query, key, head_dim**-0.5, lse))
    results = {}
    for impl in ("chunked", "fused"):
        out = multi_layer_kl(IndexerOutputs(q, k, w), teachers, None, impl=impl, query_offset=start, num_rows=seq)
        results[impl] = (out.kl_per_layer, torch.autograd.grad(out.loss, (q, k, w)))
    torch.testing.assert_close(results["fused"][0], results["chunked"][0], rtol=2e-3, atol=1e-4)
    for fused_grad, chunked_grad in zip(results["fused"][1], results["chunked"][1], strict=True):
        assert rel(fused_grad, chunked_grad) < 2e-2
