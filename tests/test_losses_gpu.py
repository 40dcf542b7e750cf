"""GPU tests of the fused Triton multi-layer KL; skipped without CUDA (and triton).

Bounds, against the float64 reference evaluated on the same bf16/fp16 values (so input rounding is not error):
loss, per-layer KL and entropy within 1e-4 relative (float32 accumulation only); gradients within 1e-2
relative in norm (they are stored in the input dtype, and dI is rounded to it before the tensor-core products,
as FlashAttention's backward does). A wrong mask, head mapping or normalisation gives errors of 1e-2 or more
in the values, so the value bound is the sharp one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl
from indexcache.losses.interface import key_mask
from indexcache.losses.reference import allowed_keys, reference_multi_layer_kl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
triton = pytest.importorskip("triton")
fused = pytest.importorskip("indexcache.losses.fused")

VALUE_BOUND = 1e-4
GRAD_BOUND = 1e-2


def make_inputs(
    *,
    batch=2,
    seq=200,
    idx_heads=4,
    idx_dim=64,
    heads=4,
    kv_heads=2,
    head_dim=64,
    layers=2,
    padding="none",
    dtype=torch.bfloat16,
    seed=0,
    teacher_layout="bhtd",
):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    indexer = IndexerOutputs(
        randn(batch, seq, idx_heads, idx_dim, scale=0.3).requires_grad_(),
        randn(batch, seq, idx_dim, scale=0.3).requires_grad_(),
        randn(batch, seq, idx_heads, scale=0.5).requires_grad_(),
    )
    teachers = []
    for _ in range(layers):
        if teacher_layout == "bthd":  # how attention code usually holds them before the kernel's transpose
            query = randn(batch, seq, heads, head_dim, scale=1.5).transpose(1, 2)
            key = randn(batch, seq, kv_heads, head_dim, scale=1.5).transpose(1, 2)
        else:
            query = randn(batch, heads, seq, head_dim, scale=1.5)
            key = randn(batch, kv_heads, seq, head_dim, scale=1.5)
        teachers.append(TeacherInputs(query, key, head_dim**-0.5))
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    pad = seq // 5
    if padding in ("left", "both"):
        mask[0, :pad] = 0
    if padding in ("right", "both"):
        mask[-1, seq - pad :] = 0
    return indexer, teachers, mask


def random_topk(batch, seq, num_selected, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(-1, seq, (batch, seq, num_selected), generator=gen, device="cuda")


def rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def as_float64(indexer: IndexerOutputs, teachers):
    indexer64 = IndexerOutputs(*(x.detach().double().requires_grad_() for x in (indexer.q, indexer.k, indexer.w)))
    teachers64 = [TeacherInputs(t.query.double(), t.key.double(), t.scaling) for t in teachers]
    return indexer64, teachers64


def check_against_reference(indexer, teachers, mask, topk=None, impl="fused", fused_config=None) -> None:
    result = multi_layer_kl(indexer, teachers, mask, topk, impl=impl, fused_config=fused_config)
    got = torch.autograd.grad(result.loss, (indexer.q, indexer.k, indexer.w))
    indexer64, teachers64 = as_float64(indexer, teachers)
    expected = reference_multi_layer_kl(indexer64, teachers64, mask, topk)
    want = torch.autograd.grad(expected.loss, (indexer64.q, indexer64.k, indexer64.w))
    assert result.num_rows == expected.num_rows
    assert rel_err(result.kl_per_layer, expected.kl_per_layer) < VALUE_BOUND
    assert rel_err(result.teacher_entropy, expected.teacher_entropy) < VALUE_BOUND
    assert result.loss.dtype == torch.float32
    assert rel_err(result.loss, expected.loss) < VALUE_BOUND
    for name, g, w in zip("qkw", got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < GRAD_BOUND, name


CASES = {
    "gqa_g2_left": dict(padding="left"),
    "mha_g1_right": dict(kv_heads=4, layers=1, padding="right", seq=333),
    "mqa_g3_both_d48": dict(kv_heads=1, layers=3, padding="both", head_dim=48, seq=150),
    "fp16_bthd": dict(dtype=torch.float16, teacher_layout="bthd", seq=130),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_dense_matches_reference(name: str) -> None:
    check_against_reference(*make_inputs(**CASES[name], seed=len(name)))


@pytest.mark.parametrize("num_selected", [16, 400])  # 400 > T: every visible key selected
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_sparse_matches_reference(name: str, num_selected: int) -> None:
    indexer, teachers, mask = make_inputs(**CASES[name], seed=num_selected)
    batch, seq = mask.shape
    check_against_reference(indexer, teachers, mask, random_topk(batch, seq, num_selected, seed=num_selected))


@pytest.mark.parametrize("heads_per_launch", [0, 3])
def test_fused_many_row_chunks(heads_per_launch: int) -> None:
    """A small dI scratch splits the rows into several chunks; dk must accumulate across them.

    With heads_per_launch=3 each layer's 4 heads take two launches, the partial head sum going through memory.
    """
    config = fused.FusedConfig(scratch_bytes=4 * 2 * 128 * 384, heads_per_launch=heads_per_launch)
    check_against_reference(*make_inputs(seq=350, padding="both", seed=3), fused_config=config)


@pytest.mark.parametrize("blocks", [(128, 64, 64, 128), (64, 128, 128, 64), (32, 64, 64, 32)])
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_gradient_block_shapes(blocks: tuple, sparse: bool) -> None:
    """Passes D and E with row and key blocks of different sizes, over several row chunks, match the reference."""
    dq_rows, dq_cols, dk_rows, dk_cols = blocks
    config = fused.FusedConfig(
        scratch_bytes=4 * 2 * 2 * 128 * 384, dq_rows=dq_rows, dq_cols=dq_cols, dk_rows=dk_rows, dk_cols=dk_cols
    )
    indexer, teachers, mask = make_inputs(seq=350, padding="both", seed=4)
    topk = random_topk(2, 350, 40, seed=6) if sparse else None
    check_against_reference(indexer, teachers, mask, topk, fused_config=config)


def test_fused_rejects_gradient_blocks_that_do_not_divide_the_tile() -> None:
    with pytest.raises(ValueError, match="must divide the pass-C tile"):
        check_against_reference(*make_inputs(seq=130), fused_config=fused.FusedConfig(dq_rows=96))


def teacher_logsumexp(teacher: TeacherInputs, mask, topk) -> torch.Tensor:
    """[B, H, T] float32 natural-log LSE over each row's keys, as an attention kernel returns it (-inf: none)."""
    batch, seq = mask.shape
    allowed = allowed_keys(key_mask(mask, batch, seq, mask.device), topk)
    key = teacher.key.float().repeat_interleave(teacher.query.shape[1] // teacher.key.shape[1], dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", teacher.query.float(), key) * teacher.scaling
    return scores.masked_fill(~allowed[:, None], float("-inf")).logsumexp(dim=-1)


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_with_teacher_logsumexp_gives_same_result(sparse: bool) -> None:
    """Given LSEs skip pass A; padding rows get -inf there, which must not leak NaN into the loss."""
    indexer, teachers, mask = make_inputs(padding="both", seed=11)
    topk = random_topk(*mask.shape, 32, seed=11) if sparse else None
    given = [dataclasses.replace(t, logsumexp=teacher_logsumexp(t, mask, topk)) for t in teachers]
    computed = multi_layer_kl(indexer, teachers, mask, topk, impl="fused")
    from_lse = multi_layer_kl(indexer, given, mask, topk, impl="fused")
    assert rel_err(from_lse.kl_per_layer, computed.kl_per_layer) < VALUE_BOUND
    assert rel_err(from_lse.teacher_entropy, computed.teacher_entropy) < VALUE_BOUND
    grads = [torch.autograd.grad(r.loss, (indexer.q, indexer.k, indexer.w)) for r in (from_lse, computed)]
    for g, w in zip(*grads, strict=True):
        assert rel_err(g, w) < GRAD_BOUND
    check_against_reference(indexer, given, mask, topk)


def test_fused_misaligned_teachers() -> None:
    """Teacher views that start off a 16-byte boundary are copied before the kernels' 16-byte loads."""
    indexer, teachers, mask = make_inputs(seed=13)
    shifted = []
    for t in teachers:
        flat = torch.empty(t.query.numel() + 1, dtype=t.query.dtype, device="cuda")
        query = flat[1:].view_as(t.query).copy_(t.query)
        assert query.data_ptr() % 16 != 0
        shifted.append(TeacherInputs(query, t.key, t.scaling))
    check_against_reference(indexer, shifted, mask)


@pytest.mark.parametrize(
    "shape",
    [
        dict(heads=64, kv_heads=64, head_dim=256, idx_heads=32, idx_dim=128, layers=4),  # GLM-5 group
        dict(heads=128, kv_heads=128, head_dim=192, idx_heads=64, idx_dim=128, layers=2),  # DeepSeek-V3.2
    ],
    ids=["glm5", "deepseek_v32"],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_real_model_shapes(shape: dict, sparse: bool) -> None:
    indexer, teachers, mask = make_inputs(batch=1, seq=384, padding="left", seed=5, **shape)
    topk = random_topk(1, 384, 128, seed=5) if sparse else None
    check_against_reference(indexer, teachers, mask, topk)


def test_auto_uses_fused_and_matches_chunked() -> None:
    indexer, teachers, mask = make_inputs(seed=7)
    from indexcache.losses import _fused_usable

    assert _fused_usable(indexer, teachers)
    auto = multi_layer_kl(indexer, teachers, mask)
    chunked = multi_layer_kl(indexer, teachers, mask, impl="chunked", chunk_size=64)
    assert rel_err(auto.kl_per_layer, chunked.kl_per_layer) < VALUE_BOUND
    for g, w in zip(
        torch.autograd.grad(auto.loss, (indexer.q, indexer.k, indexer.w)),
        torch.autograd.grad(chunked.loss, (indexer.q, indexer.k, indexer.w)),
        strict=True,
    ):
        assert rel_err(g, w) < GRAD_BOUND


def test_fused_without_grad_gives_same_values() -> None:
    indexer, teachers, mask = make_inputs(seed=9, padding="right")
    with torch.no_grad():
        plain = multi_layer_kl(indexer, teachers, mask, impl="fused")
    with_grad = multi_layer_kl(indexer, teachers, mask, impl="fused")
    assert torch.equal(plain.kl_per_layer, with_grad.kl_per_layer)
    assert not plain.loss.requires_grad
