"""Gather-based sparse attention against a materialising float64 reference of the same maths, and the family
attentions that call it (MLA latent form, llama GQA) against the stock attention restricted to the same top-k.

The reference attends through a dense [B, H, T, T] score matrix masked to each row's top-k set (a set: repeated
indices count once; -1, future and padding keys are dropped), which is what the stock models compute with their
top-k mask. Fresh random inputs for every case; gradients by autograd through the reference.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from indexcache.kernels import sparse_attention, sparse_attention_probs, visible_slots
from indexcache.kernels.config import KernelConfig
from indexcache.losses import IndexerOutputs, TeacherInputs
from indexcache.losses.reference import allowed_keys, teacher_distribution
from indexcache.model import IndexerSelection, get_family
from indexcache.model.backend import BACKEND, register_backend
from indexcache.model.context import CONTEXT_KWARG, ForwardContext
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern
from tests.conftest import triton_interpreter_usable


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
    for chunk_rows in (1, 2, 3):  # row chunks: the same slots, whatever the chunk boundary
        assert torch.equal(visible_slots(indices, real, chunk_rows=chunk_rows), expected)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16])
def test_visible_slots_in_row_chunks_equal_one_pass_on_random_indices(chunk_rows):
    torch.manual_seed(chunk_rows)
    batch, seq, topk = 2, 37, 12
    indices = torch.randint(-1, seq, (batch, seq, topk))  # future keys, -1 and repeats all occur
    real = torch.rand(batch, seq) > 0.2
    whole = visible_slots(indices, real, chunk_rows=seq)
    assert (whole == -1).any() and (whole >= 0).any()
    assert torch.equal(visible_slots(indices, real, chunk_rows=chunk_rows), whole)
    assert torch.equal(visible_slots(indices, None, chunk_rows=chunk_rows), visible_slots(indices, None, seq))


def test_sparse_attention_rejects_shapes_it_cannot_read():
    query = torch.randn(1, 4, 3, 8)
    key = torch.randn(1, 4, 2, 8)
    slots = torch.zeros(1, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="not a multiple"):
        sparse_attention(query, key, key, slots, 1.0)
    with pytest.raises(ValueError, match="visible_slots"):
        sparse_attention(query, key[:, :, :1], key[:, :, :1], slots.int(), 1.0)


# ---- the family attentions: latent (MLA) and GQA sparse forms against the stock attention -------------------------
class FixedSelection(nn.Module):
    """Stands in for an indexer: returns a fixed top-k (stock attention) or selection (IndexCache attention)."""

    def __init__(self, result: object) -> None:
        super().__init__()
        self.result = result

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.result


@pytest.mark.parametrize(
    "model_type, row_chunk",
    [("glm_moe_dsa", None), ("glm_moe_dsa", 4), ("deepseek_v32", None), ("deepseek_v32", 5), ("llama", None)],
)
def test_family_sparse_attention_equals_stock_attention_on_the_same_topk(model_type: str, row_chunk, monkeypatch):
    """One layer, float64: the IndexCache attention in sparse mode (MLA: weight-absorbed latent form; llama: GQA)
    against the stock eager attention masked to the same top-k: output and every gradient (train_base). With
    `row_chunk` the latent queries are absorbed a few rows at a time (13 rows: uneven chunks)."""
    if row_chunk is not None:
        monkeypatch.setattr("indexcache.model.families_common.LATENT_ROW_CHUNK", row_chunk)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, seq, topk = 2, 13, 5
    stock_model = tiny_model(model_type, index_topk=topk).double()
    stock_model.set_attn_implementation("eager")
    ours_model = copy.deepcopy(stock_model)
    register_backend()
    ours_model.set_attn_implementation(BACKEND)
    get_family(model_type).install_indexers(ours_model)
    stock, ours = stock_model.model.layers[0].self_attn, ours_model.model.layers[0].self_attn
    assert type(ours) is not type(stock) or model_type == "llama"

    indices = torch.randint(0, seq, (batch, seq, topk), generator=gen)
    indices[:, :, 0] = torch.arange(seq)  # every row keeps itself (stock eager would give NaN for an empty row)
    indices[:, :, 1] = indices[:, :, 2]  # a repeated key
    stock.indexer = FixedSelection(indices)
    idx_heads, idx_dim = 2, 4
    outputs = IndexerOutputs(
        q=torch.randn(batch, seq, idx_heads, idx_dim, dtype=torch.float64),
        k=torch.randn(batch, seq, idx_dim, dtype=torch.float64),
        w=torch.randn(batch, seq, idx_heads, dtype=torch.float64),
    )
    ours.indexer = FixedSelection(IndexerSelection(layer_idx=0, outputs=outputs, topk_indices=indices))

    hidden = torch.randn(batch, seq, stock_model.config.hidden_size, generator=gen, dtype=torch.float64)
    position_ids = torch.arange(seq)[None]
    rotary = stock_model.model.rotary_emb
    position_embeddings = rotary(hidden, position_ids)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(batch, 1, seq, seq)
    additive = torch.zeros(causal.shape, dtype=torch.float64).masked_fill(~causal, torch.finfo(torch.float64).min)

    context = ForwardContext()
    context.reset("sparse", IndexCachePattern("F"), None, KernelConfig())
    hidden_stock, hidden_ours = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected = stock(hidden_stock, position_embeddings=position_embeddings, attention_mask=additive)[0]
    got = ours(hidden_ours, position_embeddings=position_embeddings, attention_mask=None, **{CONTEXT_KWARG: context})[0]
    results = context.finish()
    # Bounds: stock eager takes its softmax in float32 even for float64 inputs (eager_attention_forward).
    assert float((got - expected).detach().norm() / expected.detach().norm()) < 1e-5
    assert results[0].num_rows == batch * seq  # the layer's teacher reached its group's loss

    d_out = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    names = [name for name, _ in stock.named_parameters() if not name.startswith("indexer.")]
    params_stock = dict(stock.named_parameters())
    params_ours = dict(ours.named_parameters())
    expected_grads = torch.autograd.grad(expected, [hidden_stock] + [params_stock[n] for n in names], d_out)
    grads = torch.autograd.grad(got, [hidden_ours] + [params_ours[n] for n in names], d_out)
    for name, g, e in zip(["hidden", *names], grads, expected_grads, strict=True):
        assert float((g - e).norm() / e.norm()) < 1e-5, name
    assert "kv_b_proj.weight" in names or model_type == "llama"


@pytest.mark.slow
@pytest.mark.skipif(not triton_interpreter_usable(), reason="needs triton and numpy < 2.3")
def test_triton_sparse_kernels_under_the_interpreter_match_the_float64_reference() -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / "interpret_sparse.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all cases agree" in done.stdout
