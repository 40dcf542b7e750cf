"""The sparse stage's GPU paths at a real T, within stated bf16 bounds (skipped without CUDA).

- the Triton sparse attention (output, LSE, teacher probabilities) against the float64 reference on the same
  bf16 inputs: GLM-5 latent shapes (64 heads, 576-wide shared key, 512-wide value), DeepSeek-V3.2 latent shapes
  (128 heads: two head blocks and atomics in the teacher pass), SmolLM2 GQA shapes;
- its backward through autograd (on CUDA the Triton backward) against float64 autograd;
- the Triton backward against the reference backward (bf16 and float64) at T=2048, K=256 for the latent shapes
  (the value's gradient carried by the latent's) and GQA, with a row that has no slot (zero dQ, no NaN);
- the gathered sparse KL on the GPU against `losses.reference` in float64;
- the bf16 tiny models in sparse mode: loss and metrics equal the reference on the layers' own query/key.

Bounds (relative L2 error, bf16 inputs, float32 accumulation): output 1e-2, LSE 1e-3, probabilities 1e-2,
gradients 2e-2 (the Triton backward's against float64 and against the bf16 reference alike); fp32
reference-path checks 1e-5.
"""

from __future__ import annotations

import re

import pytest
import torch

from indexcache.kernels import sparse_attention, sparse_attention_probs, visible_slots
from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl, sparse_multi_layer_kl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual))
    a, e = actual[finite].double(), expected[finite].double()
    return float((a - e).norm() / e.norm())


def topk_like(batch: int, seq: int, topk: int, device: str = "cuda") -> torch.Tensor:
    """Random visible keys per row with -1 slots for rows that see fewer than K keys, like `select_topk`."""
    scores = torch.rand(batch, seq, seq, device="cpu").tril_()
    scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), -1.0)
    values, indices = scores.topk(min(topk, seq), dim=-1)
    return indices.masked_fill(values < 0, -1).to(device)


SHAPES = {
    # heads, kv_heads, q.k width, value width, latent (value = the key's leading columns)
    "glm5_latent": (64, 1, 576, 512, True),
    "deepseek_v32_latent": (128, 1, 576, 512, True),
    "smollm2_gqa": (9, 3, 64, 64, False),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_triton_sparse_attention_matches_float64_reference(shape: str):
    heads, kv_heads, dim, value_dim, latent = SHAPES[shape]
    torch.manual_seed(0)
    batch, seq, topk = 1, 4096, 2048
    query = (torch.randn(batch, seq, heads, dim, device="cuda") * 2).bfloat16()
    key = torch.randn(batch, seq, kv_heads, dim, device="cuda").bfloat16()
    value = key[..., :value_dim] if latent else torch.randn(batch, seq, kv_heads, value_dim, device="cuda").bfloat16()
    real = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    real[:, -100:] = False  # right padding
    slots = visible_slots(topk_like(batch, seq, topk), real)
    scaling = dim**-0.5
    out, lse = sparse_attention(query, key, value, slots, scaling, impl="triton")
    probs = sparse_attention_probs(query, key, slots, lse, scaling, impl="triton")
    rows = slice(0, 1024)  # the float64 reference on the first rows (a quarter of the cost)
    q64, k64, v64 = query[:, rows].double(), key.double(), value.double()
    sub = slots[:, rows]
    ref_out, ref_lse = sparse_attention(q64, k64[:, :1024], v64[:, :1024], sub, scaling, impl="reference")
    ref_probs = sparse_attention_probs(q64, k64[:, :1024], sub, ref_lse, scaling, impl="reference")
    assert rel(out[:, rows], ref_out) < 1e-2
    assert rel(lse[:, rows], ref_lse) < 1e-3
    assert rel(probs[:, rows], ref_probs) < 1e-2
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), rtol=0, atol=2e-2)


def test_sparse_attention_backward_on_gpu_matches_float64():
    torch.manual_seed(1)
    batch, seq, topk, heads, dim, value_dim = 1, 1024, 256, 16, 576, 512
    query = (torch.randn(batch, seq, heads, dim, device="cuda") * 2).bfloat16().requires_grad_()
    latent = torch.randn(batch, seq, 1, dim, device="cuda").bfloat16().requires_grad_()
    slots = visible_slots(topk_like(batch, seq, topk), None)
    d_out = torch.randn(batch, seq, heads, value_dim, device="cuda").bfloat16()
    out, _ = sparse_attention(query, latent, latent[..., :value_dim], slots, dim**-0.5)
    grads = torch.autograd.grad(out, [query, latent], d_out)
    q64, k64 = query.detach().double().requires_grad_(), latent.detach().double().requires_grad_()
    ref, _ = sparse_attention(q64, k64, k64[..., :value_dim], slots, dim**-0.5, impl="reference")
    expected = torch.autograd.grad(ref, [q64, k64], d_out.double())
    for got, want in zip(grads, expected, strict=True):
        assert rel(got, want) < 2e-2


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_triton_sparse_backward_matches_the_reference_backward(shape: str):
    heads, kv_heads, dim, value_dim, latent = SHAPES[shape]
    torch.manual_seed(4)
    batch, seq, topk = 1, 2048, 256
    query = (torch.randn(batch, seq, heads, dim, device="cuda") * 2).bfloat16()
    key = torch.randn(batch, seq, kv_heads, dim, device="cuda").bfloat16()
    own_value = torch.randn(batch, seq, kv_heads, value_dim, device="cuda").bfloat16()
    real = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    real[:, -64:] = False  # right padding
    slots = visible_slots(topk_like(batch, seq, topk), real)
    slots[:, 100] = -1  # a row with no slot: LSE -inf
    d_out = torch.randn(batch, seq, heads, value_dim, device="cuda").bfloat16()

    def grads(impl: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [query.to(dtype).requires_grad_(), key.to(dtype).requires_grad_()]
        if not latent:
            leaves.append(own_value.to(dtype).requires_grad_())
        value = leaves[1][..., :value_dim] if latent else leaves[2]
        out, _ = sparse_attention(leaves[0], leaves[1], value, slots, dim**-0.5, impl=impl)
        return torch.autograd.grad(out, leaves, d_out.to(dtype))

    got = grads("triton", torch.bfloat16)
    reference = grads("reference", torch.bfloat16)
    exact = grads("reference", torch.float64)
    for g, r, e in zip(got, reference, exact, strict=True):
        assert torch.isfinite(g).all()
        assert rel(g, e) < 2e-2
        assert rel(g, r) < 2e-2
    assert torch.equal(got[0][:, 100], torch.zeros_like(got[0][:, 100]))


def test_gathered_sparse_kl_on_gpu_matches_reference():
    torch.manual_seed(2)
    batch, seq, topk, idx_heads, idx_dim, heads, dim = 1, 2048, 256, 8, 64, 8, 64
    indexer = IndexerOutputs(
        q=torch.randn(batch, seq, idx_heads, idx_dim, device="cuda").bfloat16().requires_grad_(),
        k=torch.randn(batch, seq, idx_dim, device="cuda").bfloat16().requires_grad_(),
        w=(torch.rand(batch, seq, idx_heads, device="cuda") * 0.1).requires_grad_(),
    )
    teachers = [
        TeacherInputs(
            torch.randn(batch, heads, seq, dim, device="cuda").bfloat16(),
            torch.randn(batch, 1, seq, dim, device="cuda").bfloat16(),
            dim**-0.5,
        )
        for _ in range(3)
    ]
    topk_indices = topk_like(batch, seq, topk)
    slots = visible_slots(topk_indices, None)
    probs = []
    for teacher in teachers:
        q, k = teacher.query.transpose(1, 2), teacher.key.transpose(1, 2)
        _, lse = sparse_attention(q, k, k, slots, teacher.scaling)
        probs.append(sparse_attention_probs(q, k, slots, lse, teacher.scaling))
    got = sparse_multi_layer_kl(indexer, probs, None, topk_indices)
    doubled = IndexerOutputs(*(x.detach().double().requires_grad_() for x in (indexer.q, indexer.k, indexer.w)))
    plain = [TeacherInputs(t.query.double(), t.key.double(), t.scaling) for t in teachers]
    expected = multi_layer_kl(doubled, plain, None, topk_indices, impl="chunked", chunk_size=512)
    assert rel(got.kl_per_layer, expected.kl_per_layer) < 1e-2
    assert rel(got.teacher_entropy, expected.teacher_entropy) < 1e-3
    grads = torch.autograd.grad(got.loss, [indexer.q, indexer.k, indexer.w])
    expected_grads = torch.autograd.grad(expected.loss, [doubled.q, doubled.k, doubled.w])
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel(g, e) < 2e-2


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v32", "llama"])
def test_bf16_model_sparse_loss_equals_reference_on_its_own_teachers(model_type: str):
    from indexcache.model import IndexCacheModel
    from indexcache.model.tiny import tiny_model
    from indexcache.pattern import IndexCachePattern

    pattern = IndexCachePattern("FSSF")
    model = IndexCacheModel(tiny_model(model_type, index_topk=16).cuda().bfloat16(), pattern, mode="sparse")
    input_ids = torch.randint(0, 256, (2, 512), device="cuda")
    groups: list[list] = []

    def observe(layer_idx, selection, teacher, mask) -> None:
        if layer_idx == pattern.owner(layer_idx):
            groups.append([selection, []])
        groups[-1][1].append(teacher)

    out = model(input_ids, observer=observe, labels=input_ids)
    out.kl_loss.backward()
    assert out.metrics["indexcache/teacher_lse_from_attention"] == 1.0
    for owner, (selection, teachers) in zip(pattern.full_layers, groups, strict=True):
        plain = [TeacherInputs(t.query.float(), t.key.float(), t.scaling) for t in teachers]
        outputs = IndexerOutputs(
            *(x.detach().float() for x in (selection.outputs.q, selection.outputs.k, selection.outputs.w))
        )
        reference = multi_layer_kl(outputs, plain, None, selection.topk_indices, impl="chunked")
        got = out.metrics[f"indexcache/kl/layer_{owner}"]
        assert got == pytest.approx(float(reference.loss), rel=2e-2)


def test_triton_index_scores_match_the_float32_scorer_and_pick_the_same_topk():
    from indexcache.model.indexer import index_scores, select_topk

    torch.manual_seed(3)
    batch, seq, heads, dim, topk = 1, 4096, 32, 128, 2048
    q = torch.randn(batch, seq, heads, dim, device="cuda").bfloat16()
    k = torch.randn(batch, seq, dim, device="cuda").bfloat16()
    w = torch.rand(batch, seq, heads, device="cuda")
    real = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    real[:, 4000:] = False
    from indexcache.kernels.triton_index import triton_index_scores

    got = triton_index_scores(q, k, w, real, 1024, 2048)
    expected = index_scores(q[:, 1024:2048], k[:, :2048], w[:, 1024:2048])
    visible = torch.ones(1024, 2048, dtype=torch.bool, device="cuda").tril(1024)[None]
    assert torch.equal(torch.isfinite(got), visible)
    assert rel(got, expected.masked_fill(~visible, float("-inf"))) < 1e-5
    fused = select_topk(q, k, w, real, topk, chunk_size=1024)
    plain = select_topk(q.cpu().float(), k.cpu().float(), w.cpu(), real.cpu(), topk, chunk_size=1024)
    agree = (fused.cpu().sort(-1).values == plain.sort(-1).values).float().mean()
    assert agree > 0.99  # near-ties may order differently under another summation order


@pytest.mark.parametrize("ties", [False, True])
def test_candidate_filter_gives_the_same_topk_on_gpu(ties: bool):
    """The Triton candidate kernel in `select_topk` at a length where the filter engages (rows beyond its 40960-slot
    buffer), with padding and at a context-parallel offset: the same tensor as without the filter. With ties: a
    third of the rows score every key 0 (their buffers overflow and are redone)."""
    from indexcache.kernels.config import TopkFilter
    from indexcache.model.indexer import select_topk

    torch.manual_seed(5)
    batch, seq, heads, dim, topk, offset = 1, 49152, 32, 128, 2048, 8192
    q = torch.randn(batch, seq - offset, heads, dim, device="cuda").bfloat16()
    k = torch.randn(batch, seq, dim, device="cuda").bfloat16()
    w = torch.rand(batch, seq - offset, heads, device="cuda")
    if ties:
        w[:, ::3] = 0.0
    real = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    real[:, 100:200] = False
    plain = select_topk(q, k, w, real, topk, 1024, offset)
    screened = select_topk(q, k, w, real, topk, 1024, offset, topk_filter=TopkFilter(key_step=16))
    assert torch.equal(screened, plain)


@pytest.mark.parametrize("tiles", ["r64k64w4s3", "r64k128w4s3", "r128k64w8s3", "r128k128w8s2", "r128k128w8s3"])
def test_triton_scorer_tiles_give_the_float32_scores(tiles: str):
    """Every tile shape bench/topk.py times scores a chunk of rows (off the diagonal, with padding keys) within
    round-off of the float32 scorer, with the same -inf pattern, at an offset as context parallelism calls it."""
    from indexcache.kernels.config import ScorerTiles
    from indexcache.kernels.triton_index import triton_index_scores
    from indexcache.model.indexer import index_scores

    rows, keys, warps, stages = (int(part) for part in re.fullmatch(r"r(\d+)k(\d+)w(\d+)s(\d+)", tiles).groups())
    torch.manual_seed(4)
    batch, seq, heads, dim, offset = 2, 3000, 32, 128, 1000  # 3000: no tile size divides it
    q = torch.randn(batch, seq - offset, heads, dim, device="cuda").bfloat16()
    k = torch.randn(batch, seq, dim, device="cuda").bfloat16()
    w = torch.rand(batch, seq - offset, heads, device="cuda")
    real = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    real[1, 2900:] = False
    start, stop = 300, 1700  # local rows; global rows 1300 .. 1699 + 1000
    got = triton_index_scores(q, k, w, real, start, stop, offset, ScorerTiles(rows, keys, warps, stages))
    expected = index_scores(q[:, start:stop], k[:, : offset + stop], w[:, start:stop])
    pos = torch.arange(offset + start, offset + stop, device="cuda")[:, None]
    visible = (torch.arange(offset + stop, device="cuda")[None, :] <= pos)[None] & real[:, None, : offset + stop]
    assert torch.equal(torch.isfinite(got), visible)
    assert rel(got, expected.masked_fill(~visible, float("-inf"))) < 1e-5
