"""The wrapped model on a GPU in bf16: the fused loss inside the real forward agrees with the chunked one."""

from __future__ import annotations

import copy

import pytest
import torch

from indexcache.kernels.config import KernelConfig
from indexcache.model import IndexCacheModel
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v32"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_fused_loss_in_the_bf16_model_matches_chunked(model_type, mode):
    torch.manual_seed(1)
    hf = tiny_model(model_type, seed=3, index_topk=16).to("cuda", torch.bfloat16)
    input_ids = torch.randint(0, hf.config.vocab_size, (2, 96), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 80:] = 0  # right padding in one row

    results = {}
    for impl in ("chunked", "fused"):
        kernels = KernelConfig(loss_impl=impl)
        model = IndexCacheModel(copy.deepcopy(hf), pattern=IndexCachePattern("FFSF"), mode=mode, kernels=kernels)
        out = model(input_ids, attention_mask=attention_mask)
        out.kl_loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.indexer_parameters()}
        results[impl] = (out.kl_loss.detach(), grads, out.metrics)
    (loss_c, grads_c, metrics_c), (loss_f, grads_f, metrics_f) = results["chunked"], results["fused"]
    # Padding (and in sparse mode the top-k set) takes the masked kernel, which also hands over its LSE (both runs
    # use the same attention kernel; only the fused loss reads the LSE).
    assert metrics_f.pop("indexcache/teacher_lse_from_attention") == 1.0
    assert metrics_c.pop("indexcache/teacher_lse_from_attention") == 1.0
    assert torch.isfinite(loss_f)
    assert _rel(loss_f, loss_c) < 1e-2
    for name in grads_c:
        assert _rel(grads_f[name], grads_c[name]) < 5e-2, name
    for key in metrics_c:
        assert metrics_f[key] == pytest.approx(metrics_c[key], rel=2e-2, abs=1e-3), key


@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
@pytest.mark.parametrize("dim, value_dim", [(64, 48), (256, 256), (192, 128)])  # small; GLM-5; DeepSeek-V3.2
def test_causal_attention_returns_the_teachers_logsumexp(kernel, dim, value_dim):
    """The dense GPU path's attention equals sdpa and its LSE equals logsumexp of the causal scaled scores."""
    from indexcache.kernels.dense_attention import causal_attention_with_lse

    gen = torch.Generator(device="cuda").manual_seed(5)
    batch, heads, seq, scaling = 2, 4, 200, dim**-0.5
    query, key = (torch.randn(batch, heads, seq, dim, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    value = torch.randn(batch, heads, seq, value_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    query.requires_grad_()
    output, lse = causal_attention_with_lse(query, key, value, scaling, 0.0, kernel)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    assert output.shape == expected.shape
    assert _rel(output, expected) < 1e-2
    scores = scaling * (query.detach().float() @ key.float().transpose(-1, -2))
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
    expected_lse = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
    assert lse.shape == (batch, heads, seq) and lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-3)
    (grad,) = torch.autograd.grad(output.float().square().sum(), query)
    (grad_expected,) = torch.autograd.grad(expected.float().square().sum(), query)
    assert _rel(grad, grad_expected) < 2e-2


def test_masked_attention_returns_the_teachers_logsumexp():
    """The masked GPU path (padding or top-k) equals sdpa with the boolean mask; its LSE is over allowed keys."""
    from indexcache.kernels.dense_attention import masked_attention_with_lse

    gen = torch.Generator(device="cuda").manual_seed(6)
    batch, heads, seq, dim, value_dim, scaling = 2, 4, 200, 64, 48, 0.13  # 200: rows not a multiple of 16
    query, key = (torch.randn(batch, heads, seq, dim, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in "qk")
    value = torch.randn(batch, heads, seq, value_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
    allowed = (torch.rand(batch, 1, seq, seq, generator=gen, device="cuda") < 0.3) & causal
    allowed |= torch.eye(seq, dtype=torch.bool, device="cuda")  # every row keeps a key, as _allowed_keys ensures
    query.requires_grad_()
    output, lse = masked_attention_with_lse(query, key, value, allowed, scaling, 0.0)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    assert output.shape == expected.shape
    assert _rel(output, expected) < 1e-2
    scores = scaling * (query.detach().float() @ key.float().transpose(-1, -2))
    expected_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert lse.shape == (batch, heads, seq) and lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-3)
    (grad,) = torch.autograd.grad(output.float().square().sum(), query)
    (grad_expected,) = torch.autograd.grad(expected.float().square().sum(), query)
    assert _rel(grad, grad_expected) < 2e-2


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v32"])
def test_unpadded_dense_model_hands_attention_lse_to_the_fused_loss(model_type):
    """Without padding every teacher carries its attention's LSE, and the loss still equals the chunked one."""
    torch.manual_seed(2)
    hf = tiny_model(model_type, seed=4, index_topk=16).to("cuda", torch.bfloat16)
    input_ids = torch.randint(0, hf.config.vocab_size, (2, 128), device="cuda")
    results = {}
    for impl in ("chunked", "fused"):
        kernels = KernelConfig(loss_impl=impl)
        model = IndexCacheModel(copy.deepcopy(hf), pattern=IndexCachePattern("FFSF"), mode="dense", kernels=kernels)
        out = model(input_ids)
        out.kl_loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.indexer_parameters()}
        results[impl] = (out.kl_loss.detach(), grads, out.metrics)
    (loss_c, grads_c, metrics_c), (loss_f, grads_f, metrics_f) = results["chunked"], results["fused"]
    assert metrics_c["indexcache/teacher_lse_from_attention"] == 1.0
    assert metrics_f["indexcache/teacher_lse_from_attention"] == 1.0
    assert _rel(loss_f, loss_c) < 1e-2
    for name in grads_c:
        assert _rel(grads_f[name], grads_c[name]) < 5e-2, name
