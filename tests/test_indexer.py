"""Lightning-indexer maths: scorer, chunked top-k, and parity of the trainable indexers with the stock HF ones."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from indexcache.kernels.config import KernelConfig
from indexcache.model.context import ForwardContext
from indexcache.model.indexer import (
    TrainableDeepseekV32Indexer,
    TrainableGlmMoeDsaIndexer,
    index_scores,
    key_padding_mask,
    rebuild_as,
    select_topk,
    topk_flagging_ties,
    topk_lowest_index_ties,
)
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern
from tests.conftest import triton_interpreter_usable

# llama's indexer is transformers' DeepseekV32Indexer (see llama_dsa.py), so it trains as one.
TRAINABLE = {
    "glm_moe_dsa": TrainableGlmMoeDsaIndexer,
    "deepseek_v32": TrainableDeepseekV32Indexer,
    "llama": TrainableDeepseekV32Indexer,
}
OTHER_FAMILY = {"glm_moe_dsa": "deepseek_v32", "deepseek_v32": "glm_moe_dsa", "llama": "glm_moe_dsa"}


def random_indexer_inputs(batch: int = 2, seq: int = 19, heads: int = 3, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(batch, seq, heads, generator=gen, dtype=torch.float64)
    return q, k, w


def visible_keys(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    real = torch.ones(batch, seq, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return torch.ones(seq, seq, dtype=torch.bool).tril()[None] & real[:, None, :]


def test_index_scores_is_weighted_relu_sum():
    q, k, w = random_indexer_inputs()
    expected = torch.einsum("btj,btjs->bts", w, torch.einsum("btjd,bsd->btjs", q, k).relu())
    torch.testing.assert_close(index_scores(q, k, w), expected)  # float64 in, float64 out
    torch.testing.assert_close(index_scores(q.float(), k.float(), w.float()).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 19, 64])
def test_select_topk_equals_brute_force_in_every_chunking(chunk_size: int):
    q, k, w = random_indexer_inputs()
    attention_mask = torch.ones(2, 19, dtype=torch.long)
    attention_mask[1, 13:] = 0  # right padding
    attention_mask[0, 5] = 0  # a hole: that key must never be chosen
    topk = 6
    got = select_topk(q, k, w, attention_mask, topk, chunk_size=chunk_size)
    assert got.shape == (2, 19, topk) and got.dtype == torch.long

    visible = visible_keys(attention_mask, 2, 19)
    scores = index_scores(q, k, w).masked_fill(~visible, float("-inf"))
    for b in range(2):
        for t in range(19):
            num_visible = int(visible[b, t].sum())
            row = got[b, t].tolist()
            # Invalid slots are -1 and come last; the valid ones are distinct visible keys holding the best scores,
            # best first (compared by score: keys whose relus are all zero tie exactly at 0).
            assert row.count(-1) == max(topk - num_visible, 0)
            chosen = [s for s in row if s >= 0]
            assert row[: len(chosen)] == chosen and len(set(chosen)) == len(chosen)
            assert all(visible[b, t, s] for s in chosen)
            expected = scores[b, t].topk(min(topk, num_visible)).values
            torch.testing.assert_close(scores[b, t, chosen], expected, rtol=0, atol=0)


def test_select_topk_keeps_at_most_seq_len_columns():
    q, k, w = random_indexer_inputs(seq=5)
    got = select_topk(q, k, w, None, topk=64)
    assert got.shape == (2, 5, 5)
    # Row t sees t + 1 keys, so it lists all of them and pads 4 - t slots with -1.
    for t in range(5):
        assert sorted(got[0, t, : t + 1].tolist()) == list(range(t + 1))
        assert (got[0, t, t + 1 :] == -1).all()


@pytest.mark.parametrize(("topk", "chunk_size"), [(0, 4), (4, 0)])
def test_select_topk_rejects_nonpositive_arguments(topk: int, chunk_size: int):
    q, k, w = random_indexer_inputs()
    with pytest.raises(ValueError, match="invalid"):
        select_topk(q, k, w, None, topk, chunk_size)


def test_key_padding_mask_reads_last_row_of_bool_and_additive_masks():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]]).bool()
    causal = visible_keys(attention_mask, 2, 4)[:, None]  # [B, 1, T, S] like the stock mask
    assert torch.equal(key_padding_mask(causal), attention_mask)
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_mask(additive[:, 0]), attention_mask)
    assert key_padding_mask(None) is None
    # The indexcache backend hands the [B, S] real-key mask itself (it builds no [T, S] mask).
    assert torch.equal(key_padding_mask(attention_mask.long()), attention_mask)


def test_rebuild_as_reuses_stock_parameters_under_checkpoint_names():
    model = tiny_model("glm_moe_dsa")
    stock = model.model.layers[1].self_attn.indexer
    trainable = rebuild_as(stock, TrainableGlmMoeDsaIndexer)
    assert isinstance(trainable, type(stock))
    names = [name for name, _ in trainable.named_parameters()]
    assert names == ["wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"]
    for (_, mine), (_, theirs) in zip(trainable.named_parameters(), stock.named_parameters(), strict=True):
        assert mine is theirs and mine.requires_grad


def capture_stock_indexer_calls(model: torch.nn.Module) -> list[tuple[int, tuple, dict, torch.Tensor]]:
    """Run-time record of every stock indexer call: (layer, args, kwargs, returned top-k)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((module.layer_idx, args, kwargs, output))

    for layer in model.model.layers:
        layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True)
    return calls


def assert_same_sets_up_to_ties(ours, stock, scores, visible, tol: float = 1e-4) -> None:
    """Row by row, the two top-k sets (visible keys only) agree, except keys tied with the K-th score."""
    for b, t in torch.cartesian_prod(torch.arange(ours.shape[0]), torch.arange(ours.shape[1])).tolist():
        mine = {s for s in ours[b, t].tolist() if s >= 0}
        theirs = {s for s in stock[b, t].tolist() if visible[b, t, s]}
        if mine == theirs:
            continue
        kth = min(scores[b, t, s].item() for s in mine)
        for s in mine ^ theirs:
            assert abs(scores[b, t, s].item() - kth) <= tol * max(1.0, abs(kth)), (b, t, s)


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v32", "llama"])
def test_trainable_indexer_selects_the_stock_topk(model_type: str):
    model = tiny_model(model_type, seed=1)
    model.set_attn_implementation("eager")
    input_ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 29, dtype=torch.long)
    attention_mask[1, 20:] = 0
    calls = capture_stock_indexer_calls(model)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, use_cache=False)
    assert len(calls) == 4
    visible = visible_keys(attention_mask, 2, 29)

    rope_mattered = False
    for layer_idx, args, kwargs, stock_topk in calls:
        stock_indexer = model.model.layers[layer_idx].self_attn.indexer
        ours = rebuild_as(copy.deepcopy(stock_indexer), TRAINABLE[model_type])
        selection = ours(*args, **kwargs)
        assert selection.layer_idx == layer_idx
        assert selection.topk_indices.shape == (2, 29, 8)
        out = selection.outputs
        scores = index_scores(out.q, out.k, out.w).detach()
        assert_same_sets_up_to_ties(selection.topk_indices, stock_topk, scores, visible)
        # w carries the stock scales: softmax_scale inside the relu and the H_I^-0.5 head average outside it.
        weights = stock_indexer.weights_proj(args[0]).float() * stock_indexer.n_heads**-0.5
        stock_scores = torch.einsum(
            "btj,btjs->bts",
            weights,
            torch.einsum("btjd,bsd->btjs", out.q, out.k).mul(stock_indexer.softmax_scale).relu(),
        )
        torch.testing.assert_close(scores, stock_scores.detach(), rtol=1e-5, atol=1e-6)
        # The other family's RoPE layout selects differently: the comparison above can fail.
        other = rebuild_as(copy.deepcopy(stock_indexer), TRAINABLE[OTHER_FAMILY[model_type]])
        rope_mattered |= not torch.equal(other(*args, **kwargs).topk_indices, selection.topk_indices)
    assert rope_mattered


def test_trainable_indexer_is_differentiable_and_detaches_its_inputs():
    model = tiny_model("deepseek_v32")
    indexer = rebuild_as(model.model.layers[0].self_attn.indexer, TrainableDeepseekV32Indexer)
    hidden = torch.randn(1, 6, 64, requires_grad=True)
    q_resid = torch.randn(1, 6, 32, requires_grad=True)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(6)[None])
    dense = ForwardContext()
    dense.reset("dense", IndexCachePattern("F"), None, KernelConfig())  # a dense forward computes no top-k
    selection = indexer(hidden, q_resid, cos_sin, visible_keys(None, 1, 6), context=dense)
    assert selection.topk_indices is None
    out = selection.outputs
    assert out.q.shape == (1, 6, 4, 32) and out.k.shape == (1, 6, 32) and out.w.shape == (1, 6, 4)
    (out.q.sum() + out.k.sum() + out.w.sum()).backward()
    assert hidden.grad is None and q_resid.grad is None
    assert all(param.grad is not None for param in indexer.parameters())


def test_trainable_indexer_refuses_a_kv_cache():
    model = tiny_model("glm_moe_dsa")
    indexer = rebuild_as(model.model.layers[0].self_attn.indexer, TrainableGlmMoeDsaIndexer)
    hidden = torch.randn(1, 3, 64)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(ValueError, match="use_cache=False"):
        indexer(hidden, torch.randn(1, 3, 32), cos_sin, None, None, past_key_values=object())


def _rule_on_full_rows(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, topk: int) -> torch.Tensor:
    """The documented tie rule applied row by row in plain Python: visible keys ordered by (score desc, index asc)."""
    scores = index_scores(q, k, w)
    batch, seq, _ = scores.shape
    width = min(topk, seq)
    out = torch.full((batch, seq, width), -1, dtype=torch.long)
    for b in range(batch):
        for t in range(seq):
            ranked = sorted(range(t + 1), key=lambda s, row=scores[b, t]: (-float(row[s]), s))[:width]
            out[b, t, : len(ranked)] = torch.tensor(ranked)
    return out


def test_topk_ties_follow_one_rule_at_every_chunk_size():
    """Planted exact ties (keys whose every indexer head scores 0 after the ReLU, and duplicated keys): the lower key
    index wins, in membership and order, whatever the row chunk size, and equal to the rule applied to whole rows."""
    torch.manual_seed(5)
    batch, seq, heads, dim, topk = 2, 40, 3, 8, 6
    q = torch.randn(batch, seq, heads, dim).abs()  # every query has positive entries only
    k = torch.randn(batch, seq, dim).abs()
    k[:, ::2] = -k[:, ::2]  # even keys score exactly 0 on every head: ties across the K-th place
    k[:, 7] = k[:, 3]  # two keys with identical positive scores
    w = torch.rand(batch, seq, heads)
    expected = _rule_on_full_rows(q, k, w, topk)
    assert (index_scores(q, k, w) == 0).sum() > batch * seq * seq // 4  # the ties are really there
    for chunk_size in (1, 3, 7, 16, 1024):
        assert torch.equal(select_topk(q, k, w, None, topk, chunk_size=chunk_size), expected)
    # Context parallelism's offset runs follow the same rule.
    part = select_topk(q[:, 20:], k, w[:, 20:], None, topk, chunk_size=5, query_offset=20)
    assert torch.equal(part, expected[:, 20:])


def test_index_order_keeps_the_same_members_sorted_by_position():
    """`order="index"` (one sort fewer) picks exactly the members of the score order, ties included, listed by
    increasing key position; on fresh random rows with planted ties across the K-th place."""
    torch.manual_seed(11)
    scores = torch.randn(64, 300).round(decimals=1)  # many exact ties
    scores[:8, 100:] = 0.0  # rows whose K-th place falls inside a long tie
    scores[8:12] = float("-inf")
    scores[8:12, :5] = 1.0
    for width in (1, 7, 50, 300):
        by_score, by_score_idx = topk_lowest_index_ties(scores, width)
        by_index, by_index_idx = topk_lowest_index_ties(scores, width, order="index")
        assert torch.equal(by_index_idx, by_score_idx.sort(dim=-1).values)
        assert torch.equal(by_index, torch.gather(scores, -1, by_index_idx))
        assert bool((by_index_idx[:, 1:] > by_index_idx[:, :-1]).all())
        # The rule itself: every member beats, or ties with a higher index than, every left-out key.
        threshold = by_score[:, -1:]
        members = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, by_index_idx, True)
        assert bool((scores[~members].view(64, -1) <= threshold).all())
        last_tied = torch.where(members & (scores == threshold), torch.arange(300), -1).max(-1).values
        first_left = torch.where(~members & (scores == threshold), torch.arange(300), 301).min(-1).values
        assert bool((last_tied < first_left).all())
    with pytest.raises(ValueError, match="order='value' is unknown"):
        topk_lowest_index_ties(scores, 3, order="value")


def test_flagged_rows_are_exactly_those_whose_kth_score_ties_a_left_out_key():
    """`topk_flagging_ties` (one topk of K + 1, no host sync) agrees with the rule on every row it does not flag, and
    flags exactly the rows where a finite tie crosses the K-th place (counted over the whole row)."""
    torch.manual_seed(12)
    scores = torch.randn(2, 96, 200).round(decimals=1)  # many exact ties
    scores[0, :10, 50:] = 0.0
    scores[1, 20:30, 3:] = float("-inf")  # rows with fewer than K visible keys: -inf ties, never flagged
    for width in (1, 5, 40, 199, 200):
        values, indices, straddles = topk_flagging_ties(scores, width)
        rule_values, rule_indices = topk_lowest_index_ties(scores, width)
        if width == scores.shape[-1]:
            assert straddles is None
            assert torch.equal(indices, rule_indices)
            continue
        threshold = rule_values[..., -1:]
        tied_total = (scores == threshold).sum(-1)
        tied_kept = (rule_values == threshold).sum(-1)
        expected = (tied_total > tied_kept) & (threshold[..., 0] > float("-inf"))
        assert torch.equal(straddles, expected)
        assert bool(expected.any()), "the planted ties cross the K-th place somewhere"
        # -inf slots name invisible keys: select_topk writes -1 there, whichever keys they were.
        named, rule_named = (
            i.masked_fill(v == float("-inf"), -1) for v, i in ((values, indices), (rule_values, rule_indices))
        )
        assert torch.equal(named[~straddles], rule_named[~straddles])
        # Where a flagged row's output differs from the rule it is only in which tied keys made it in.
        assert torch.equal(values, rule_values)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of `indexer.<name>` (the real function still runs)."""
    from indexcache.model import indexer

    calls: list[int] = []
    real = getattr(indexer, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(indexer, name, counted)
    return calls


def test_index_candidates_keeps_exactly_the_visible_keys_at_or_above_the_threshold():
    """The PyTorch reference of the filter's buffer: every visible key scoring >= tau, with its score and position,
    in key order; counts past the capacity when a row's keys do not fit (and only `capacity` stored)."""
    from indexcache.model.indexer import index_candidates

    gen = torch.Generator().manual_seed(21)
    scores = torch.randn(2, 30, 90, generator=gen).round(decimals=1)  # ties at the threshold
    scores[:, :, 60:] = float("-inf")  # invisible keys
    tau = torch.randn(2, 30, generator=gen)
    tau[0, 3] = float("-inf")  # every visible key
    tau[1, 4] = 10.0  # none
    capacity = 40
    values, keys, counts = index_candidates(scores, tau, capacity)
    keep = (scores >= tau[..., None]) & (scores > float("-inf"))
    assert torch.equal(counts, keep.sum(-1, dtype=torch.int32))
    assert int(counts[0, 3]) == 60 > capacity and int(counts[1, 4]) == 0
    for b in range(2):
        for t in range(30):
            expected = keep[b, t].nonzero()[:, 0][:capacity]
            n = expected.numel()
            assert torch.equal(keys[b, t, :n].long(), expected)
            assert torch.equal(values[b, t, :n], scores[b, t, expected])
            assert bool((values[b, t, n:] == float("-inf")).all())


@pytest.mark.parametrize(
    ("chunk_size", "query_offset", "padded"), [(1, 0, False), (7, 0, True), (64, 0, False), (16, 40, True)]
)
def test_candidate_filter_gives_the_same_topk(monkeypatch: pytest.MonkeyPatch, chunk_size, query_offset, padded):
    """With the filter the top-k is the same tensor as without it (fresh random rows, padding, context parallelism's
    offset), the filter answers the long chunks itself (no chunk redone: no ties here), and short chunks skip it."""
    from indexcache.kernels.config import TopkFilter

    batch, seq, topk = 2, 260, 8
    q, k, w = random_indexer_inputs(batch=batch, seq=seq, heads=3, dim=8, seed=chunk_size + query_offset)
    w = w.abs()  # positive head weights: few rows' K-th score is an exact 0 (a tie the rule redoes)
    mask = None
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, 200:] = 0
        mask[0, 70:75] = 0
    # A buffer of 128 slots a row (K = 8 spreads the count widely: headroom 3); chunks whose last row sees more
    # keys than that use it.
    screen = TopkFilter(key_step=4, headroom=3.0)
    assert screen.capacity(topk) == 128
    candidates, redone = _spy(monkeypatch, "index_candidates"), _spy(monkeypatch, "topk_lowest_index_ties")
    expected = select_topk(q[:, query_offset:], k, w[:, query_offset:], mask, topk, chunk_size, query_offset)
    redone_plain = len(redone)  # chunks with a real tie across the K-th place (rare here: an exact 0 score)
    redone.clear()
    got = select_topk(
        q[:, query_offset:], k, w[:, query_offset:], mask, topk, chunk_size, query_offset, topk_filter=screen
    )
    assert torch.equal(got, expected)
    rows = seq - query_offset
    long_chunks = sum(1 for start in range(0, rows, chunk_size) if query_offset + min(start + chunk_size, rows) > 128)
    assert len(candidates) == long_chunks > 0
    assert len(redone) <= redone_plain  # the filter answered its chunks itself: no overflow, no disagreement


def test_candidate_filter_redoes_ties_overflows_and_disagreeing_rows(monkeypatch: pytest.MonkeyPatch):
    """Rows the filter cannot answer exactly are redone without it, and the result follows the tie rule: planted
    ties across the K-th place, rows whose every key ties at 0 (every visible key is a candidate: the buffer
    overflows), and a row whose threshold is raised above all its keys (as if the subset's scores disagreed with
    the full ones)."""
    from indexcache.kernels.config import TopkFilter
    from indexcache.model import indexer

    torch.manual_seed(6)
    batch, seq, heads, dim, topk = 2, 200, 3, 8, 6
    q = torch.randn(batch, seq, heads, dim).abs()
    k = torch.randn(batch, seq, dim).abs()
    k[:, ::2] = -k[:, ::2]  # even keys score exactly 0 on every head
    k[:, 7] = k[:, 3]
    w = torch.rand(batch, seq, heads)
    w[1, 150:] = 0.0  # rows whose every key scores 0: all tie
    expected = _rule_on_full_rows(q, k, w, topk)
    screen = TopkFilter(key_step=3, headroom=1.0)  # a buffer of 64 slots a row
    redone = _spy(monkeypatch, "topk_lowest_index_ties")
    assert torch.equal(select_topk(q, k, w, None, topk, 32, topk_filter=screen), expected)
    assert redone, "the all-tied rows overflow the buffer and are redone"

    # An overflow without ties: the subset's keys (every 3rd) score 0, the others more the later they come, so
    # every other key passes the threshold and the buffer keeps the earliest of them, not the best.
    real = indexer.index_candidates
    largest_count: list[int] = []

    def recorded(scores, tau, capacity):
        found = real(scores, tau, capacity)
        largest_count.append(int(found[2].max()))
        return found

    monkeypatch.setattr(indexer, "index_candidates", recorded)
    k3 = torch.randn(batch, seq, dim).abs() * (1 + torch.arange(seq) / 50)[None, :, None]
    k3[:, ::3] = -k3[:, ::3]
    expected = _rule_on_full_rows(q, k3, w, topk)
    assert torch.equal(select_topk(q, k3, w, None, topk, 32, topk_filter=screen), expected)
    assert max(largest_count) > screen.capacity(topk)

    def disagreeing(scores, tau, capacity):
        tau = tau.clone()
        tau[0, 5] = float("inf")  # no key passes: fewer than K candidates with a finite threshold
        return real(scores, tau, capacity)

    monkeypatch.setattr(indexer, "index_candidates", disagreeing)  # over `recorded`, which calls the real one
    q2, k2, w2 = random_indexer_inputs(batch=1, seq=seq, seed=3)
    plain = select_topk(q2, k2, w2, None, topk, 32)
    redone.clear()
    assert torch.equal(select_topk(q2, k2, w2, None, topk, 32, topk_filter=screen), plain)
    assert redone, "the disagreeing row's chunk is redone"


def test_candidate_filter_settings_are_checked():
    from indexcache.kernels.config import TopkFilter

    with pytest.raises(ValueError, match=r"key_step=1 is invalid: use 2 or more"):
        TopkFilter(key_step=1)
    with pytest.raises(ValueError, match=r"headroom=0.5 is invalid: use 1 or more"):
        TopkFilter(headroom=0.5)
    assert TopkFilter(key_step=16).capacity(2048) == 40960  # 1.25 x 16 x 2048
    assert TopkFilter(key_step=2, headroom=1.0).capacity(100) == 256  # rounded up to 64


@pytest.mark.slow
@pytest.mark.skipif(not triton_interpreter_usable(), reason="needs triton and numpy < 2.3")
def test_scorer_kernels_under_the_interpreter_match_the_references() -> None:
    """bench/interpret_topk.py: the key-step scorer and the candidate kernel against the PyTorch references."""
    script = Path(__file__).resolve().parents[1] / "bench" / "interpret_topk.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all cases agree" in done.stdout
