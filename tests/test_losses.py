"""CPU tests of the multi-layer KL (indexcache.losses): fast paths against the float64 reference.

Bounds: in float64 the chunked path must match the reference to a relative error of 1e-10 in the loss, the
per-layer KL and entropy, and each gradient (||a - b|| / ||b||); the observed error is ~1e-16, so a wrong mask,
normalisation or gradient term (errors of order 1e-2 or more) cannot pass.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from indexcache.losses import IndexerOutputs, TeacherInputs, multi_layer_kl
from indexcache.losses.reference import allowed_keys, reference_multi_layer_kl, teacher_distribution

F64_BOUND = 1e-10
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    batch: int = 2
    seq: int = 11
    idx_heads: int = 3
    idx_dim: int = 8
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 2
    padding: str = "none"  # none | left | right | both


def make_inputs(case: Case, seed: int, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    q = randn(case.batch, case.seq, case.idx_heads, case.idx_dim).requires_grad_()
    k = randn(case.batch, case.seq, case.idx_dim).requires_grad_()
    w = randn(case.batch, case.seq, case.idx_heads, scale=0.5).requires_grad_()
    teachers = [
        TeacherInputs(
            randn(case.batch, case.heads, case.seq, case.head_dim, scale=1.5),
            randn(case.batch, case.kv_heads, case.seq, case.head_dim, scale=1.5),
            case.head_dim**-0.5,
        )
        for _ in range(case.layers)
    ]
    mask = torch.ones(case.batch, case.seq, dtype=torch.long)
    pad = max(1, case.seq // 4)
    if case.padding in ("left", "both"):
        mask[0, :pad] = 0
    if case.padding in ("right", "both"):
        mask[-1, case.seq - pad :] = 0
    return IndexerOutputs(q, k, w), teachers, mask


def random_topk(case: Case, num_selected: int, seed: int) -> torch.Tensor:
    """Adversarial selections: -1 entries, future keys, padding keys and duplicates all appear."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(-1, case.seq, (case.batch, case.seq, num_selected), generator=gen)


def topk_from_scores(indexer: IndexerOutputs, mask: torch.Tensor, num_selected: int) -> torch.Tensor:
    """What the model feeds in: torch.topk over masked indexer scores, -1 where a row has fewer visible keys."""
    with torch.no_grad():
        real = mask.bool()
        allowed = allowed_keys(real, None)
        scores = torch.einsum("btjd,bsd->btjs", indexer.q, indexer.k).relu()
        scores = (scores * indexer.w[..., None]).sum(2).masked_fill(~allowed, float("-inf"))
        values, indices = scores.topk(min(num_selected, scores.shape[-1]), dim=-1)
        indices = indices.masked_fill(values == float("-inf"), -1)
    pad = num_selected - indices.shape[-1]
    return torch.nn.functional.pad(indices, (0, pad), value=-1) if pad > 0 else indices


def grads(result, indexer: IndexerOutputs):
    return torch.autograd.grad(result.loss, (indexer.q, indexer.k, indexer.w))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm().clamp_min(1e-300))


def assert_same(actual, expected, indexer: IndexerOutputs, bound: float = F64_BOUND) -> None:
    assert actual.num_rows == expected.num_rows
    assert rel_err(actual.loss, expected.loss) < bound
    assert rel_err(actual.kl_per_layer, expected.kl_per_layer) < bound
    assert rel_err(actual.teacher_entropy, expected.teacher_entropy) < bound
    for got, want in zip(grads(actual, indexer), grads(expected, indexer), strict=True):
        assert rel_err(got, want) < bound


def loop_oracle(indexer: IndexerOutputs, teachers, mask, topk=None) -> torch.Tensor:
    """docs/DESIGN.md section 1 written row by row, sharing no code with the implementations."""
    q, k, w = indexer.q, indexer.k, indexer.w
    total, rows = q.new_zeros(()), 0
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            if not mask[b, t]:
                continue
            keys = [s for s in range(t + 1) if mask[b, s]]
            if topk is not None:
                keys = sorted({int(s) for s in topk[b, t] if 0 <= int(s) <= t and mask[b, int(s)]})
            if not keys:
                continue
            rows += 1
            logits = torch.stack([(w[b, t] * (q[b, t] @ k[b, s]).relu()).sum() for s in keys])
            log_q = logits.log_softmax(0)
            row_kl = q.new_zeros(())
            for teacher in teachers:
                heads, kv_heads = teacher.query.shape[1], teacher.key.shape[1]
                kv_of = heads // kv_heads  # GQA: head h reads key head h // (H / H_kv)
                scores = [teacher.key[b, h // kv_of, keys] @ teacher.query[b, h, t] for h in range(heads)]
                p = sum((s * teacher.scaling).softmax(0) for s in scores) / heads
                row_kl = row_kl + (p * (p.log() - log_q)).sum()
            total = total + row_kl / len(teachers)
    return total / max(rows, 1)


CASES = {
    "mha_g1": Case(heads=3, kv_heads=3, layers=1),
    "gqa_g3_left": Case(layers=3, padding="left"),
    "gqa_g2_right": Case(padding="right", seq=13),
    "mqa_both_b3": Case(batch=3, kv_heads=1, padding="both", seq=9),
}


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_matches_reference_dense(name: str, chunk_size: int) -> None:
    indexer, teachers, mask = make_inputs(CASES[name], seed=zlib.crc32(name.encode()) + chunk_size)
    expected = reference_multi_layer_kl(indexer, teachers, mask)
    actual = multi_layer_kl(indexer, teachers, mask, impl="chunked", chunk_size=chunk_size)
    assert_same(actual, expected, indexer)


@pytest.mark.parametrize("num_selected", [3, 20])  # 20 > T: K larger than the sequence
@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_matches_reference_sparse(name: str, num_selected: int) -> None:
    case = CASES[name]
    indexer, teachers, mask = make_inputs(case, seed=7 + num_selected)
    for topk in (random_topk(case, num_selected, seed=num_selected), topk_from_scores(indexer, mask, num_selected)):
        expected = reference_multi_layer_kl(indexer, teachers, mask, topk)
        actual = multi_layer_kl(indexer, teachers, mask, topk, impl="chunked", chunk_size=5)
        assert_same(actual, expected, indexer)


@pytest.mark.parametrize("sparse", [False, True])
def test_reference_matches_row_by_row_definition(sparse: bool) -> None:
    case = Case(seq=8, padding="both", layers=2)
    indexer, teachers, mask = make_inputs(case, seed=3)
    topk = random_topk(case, 4, seed=3) if sparse else None
    expected = loop_oracle(indexer, teachers, mask, topk)
    actual = reference_multi_layer_kl(indexer, teachers, mask, topk)
    assert rel_err(actual.loss, expected) < F64_BOUND
    for got, want in zip(
        grads(actual, indexer), torch.autograd.grad(expected, (indexer.q, indexer.k, indexer.w)), strict=True
    ):
        assert rel_err(got, want) < F64_BOUND


def test_sparse_rows_with_few_visible_keys() -> None:
    """Rows with fewer than K visible keys use all of them; a row whose set has none carries no loss."""
    case = Case(batch=1, seq=6, layers=1, heads=2, kv_heads=2)
    indexer, teachers, mask = make_inputs(case, seed=11)
    topk = torch.full((1, 6, 4), -1)
    topk[0, :, 0] = torch.arange(6)  # every row selects itself ...
    topk[0, 2] = torch.tensor([5, 4, -1, 3])  # ... except row 2, which names only future keys: no loss
    topk[0, 5] = torch.tensor([0, 1, 2, 0])  # duplicate entry
    result = multi_layer_kl(indexer, teachers, mask, topk, impl="chunked")
    assert result.num_rows == 5
    # Rows 0, 1, 3, 4 see one key: their distributions are both one-hot, KL 0; only row 5 (keys {0, 1, 2}) counts.
    row5 = torch.full((1, 6, 4), -1)
    row5[0, 5, :3] = torch.tensor([0, 1, 2])
    only_row5 = reference_multi_layer_kl(indexer, teachers, mask, row5)
    assert only_row5.num_rows == 1
    assert rel_err(result.loss * 5, only_row5.loss) < F64_BOUND
    assert float(only_row5.loss.detach()) > 1e-3


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("sparse", [False, True])
def test_multi_layer_sum_equals_kl_of_mean_teacher(impl: str, sparse: bool) -> None:
    """(1/G) sum_j KL(p_j||q) = KL(p_bar||q) + [H(p_bar) - mean_j H(p_j)], with identical gradients."""
    case = Case(layers=3, padding="left")
    indexer, teachers, mask = make_inputs(case, seed=21)
    topk = random_topk(case, 5, seed=21) if sparse else None
    multi = multi_layer_kl(indexer, teachers, mask, topk, impl=impl, chunk_size=4)

    real = mask.bool()
    allowed = allowed_keys(real, topk)
    rows = allowed.any(-1) & real
    allowed = allowed | ~rows[..., None]
    p_bar = sum(teacher_distribution(t, allowed, torch.float64) for t in teachers) / len(teachers)
    logits = (torch.einsum("btjd,bsd->btjs", indexer.q, indexer.k).relu() * indexer.w[..., None]).sum(2)
    log_q = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1).masked_fill(~allowed, 0.0)
    weight = rows.double() / rows.sum()
    kl_bar = ((torch.xlogy(p_bar, p_bar) - p_bar * log_q).sum(-1) * weight).sum()
    entropy_bar = (-torch.xlogy(p_bar, p_bar).sum(-1) * weight).sum()
    constant = entropy_bar - multi.teacher_entropy.mean()

    assert float(constant) > 1e-3  # the teachers differ, so the identity is not trivially 0 = 0
    assert rel_err(multi.loss, kl_bar + constant) < F64_BOUND
    for got, want in zip(
        grads(multi, indexer), torch.autograd.grad(kl_bar, (indexer.q, indexer.k, indexer.w)), strict=True
    ):
        assert rel_err(got, want) < F64_BOUND


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_no_gradient_reaches_teachers(impl: str) -> None:
    indexer, teachers, mask = make_inputs(Case(), seed=5)
    for teacher in teachers:
        teacher.query.requires_grad_()
        teacher.key.requires_grad_()
    result = multi_layer_kl(indexer, teachers, mask, impl=impl)
    result.loss.backward()
    assert all(t.query.grad is None and t.key.grad is None for t in teachers)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (indexer.q, indexer.k, indexer.w))


def test_upstream_gradient_is_applied() -> None:
    indexer, teachers, mask = make_inputs(Case(), seed=9)
    plain = grads(multi_layer_kl(indexer, teachers, mask, impl="chunked"), indexer)
    result = multi_layer_kl(indexer, teachers, mask, impl="chunked")
    scaled = torch.autograd.grad(result.loss * -2.5, (indexer.q, indexer.k, indexer.w))
    for got, want in zip(scaled, plain, strict=True):
        assert rel_err(got, want * -2.5) < F64_BOUND


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_padding_is_invisible(impl: str) -> None:
    """Values at padding positions change nothing, and padded rows receive no gradient."""
    case = Case(padding="both")
    indexer, teachers, mask = make_inputs(case, seed=13)
    before = multi_layer_kl(indexer, teachers, mask, impl=impl)
    pad = ~mask.bool()
    with torch.no_grad():
        noisy = IndexerOutputs(
            indexer.q.masked_fill(pad[..., None, None], 3.0),
            indexer.k.masked_fill(pad[..., None], -2.0),
            indexer.w.masked_fill(pad[..., None], 5.0),
        )
        noisy_teachers = [
            TeacherInputs(
                t.query.masked_fill(pad[:, None, :, None], 9.0),
                t.key.masked_fill(pad[:, None, :, None], 7.0),
                t.scaling,
            )
            for t in teachers
        ]
    after = multi_layer_kl(noisy, noisy_teachers, mask, impl=impl)
    assert before.num_rows == int(mask.sum())
    assert rel_err(after.kl_per_layer, before.kl_per_layer) < F64_BOUND
    dq, dk, dw = grads(before, indexer)
    assert dq[pad].abs().max() == 0 and dk[pad].abs().max() == 0 and dw[pad].abs().max() == 0
    assert dq[~pad].abs().max() > 0


def test_all_padding_gives_zero_loss() -> None:
    indexer, teachers, mask = make_inputs(Case(), seed=17)
    result = multi_layer_kl(indexer, teachers, torch.zeros_like(mask), impl="chunked")
    assert result.num_rows == 0 and float(result.loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads(result, indexer))


def test_no_mask_equals_all_ones_mask() -> None:
    indexer, teachers, mask = make_inputs(Case(), seed=19)
    assert_same(
        multi_layer_kl(indexer, teachers, None, impl="chunked"),
        reference_multi_layer_kl(indexer, teachers, torch.ones_like(mask)),
        indexer,
    )


def test_bfloat16_inputs_keep_dtype_and_accuracy() -> None:
    """bf16 inputs accumulate in float32: values within 1e-3, gradients (stored in bf16) within 1e-2 of float64."""
    case = Case(seq=32, padding="right")
    indexer, teachers, mask = make_inputs(case, seed=23, dtype=torch.bfloat16)
    result = multi_layer_kl(indexer, teachers, mask, impl="chunked", chunk_size=10)
    dq, dk, dw = grads(result, indexer)
    assert result.loss.dtype == torch.float32  # the reported value is not rounded to bf16
    assert dq.dtype == dk.dtype == dw.dtype == torch.bfloat16
    as64 = IndexerOutputs(*(x.detach().double().requires_grad_() for x in (indexer.q, indexer.k, indexer.w)))
    teachers64 = [TeacherInputs(t.query.double(), t.key.double(), t.scaling) for t in teachers]
    expected = reference_multi_layer_kl(as64, teachers64, mask)
    assert rel_err(result.kl_per_layer.double(), expected.kl_per_layer) < 1e-3  # accumulated in float32
    for got, want in zip((dq, dk, dw), grads(expected, as64), strict=True):
        assert rel_err(got.double(), want) < 1e-2  # bf16 rounding of the stored gradient


def test_auto_is_chunked_on_cpu() -> None:
    indexer, teachers, mask = make_inputs(Case(), seed=29)
    auto = multi_layer_kl(indexer, teachers, mask)
    assert_same(auto, multi_layer_kl(indexer, teachers, mask, impl="chunked"), indexer)


def test_invalid_inputs_raise() -> None:
    indexer, teachers, mask = make_inputs(Case(), seed=31)
    with pytest.raises(ValueError, match="impl"):
        multi_layer_kl(indexer, teachers, mask, impl="flash")
    with pytest.raises(ValueError, match=r"indexer\.k"):
        multi_layer_kl(IndexerOutputs(indexer.q, indexer.k[:, :, :-1], indexer.w), teachers, mask)
    with pytest.raises(ValueError, match="not a multiple"):
        bad = TeacherInputs(teachers[0].query[:, :3], teachers[0].key, teachers[0].scaling)
        multi_layer_kl(indexer, [bad], mask)
    with pytest.raises(ValueError, match="teachers is empty"):
        multi_layer_kl(indexer, [], mask)
    with pytest.raises(ValueError, match="topk_indices"):
        multi_layer_kl(indexer, teachers, mask, torch.zeros(2, 11, 3))


def test_package_imports_without_triton() -> None:
    code = "import sys, indexcache.losses; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
