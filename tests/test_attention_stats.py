"""Recall, coverage and overlap: a hand-computed example, chunked versus materialised on fresh random inputs, and
the observer wired into a real model's forward."""

from __future__ import annotations

import math

import pytest
import torch

from indexcache.attention_stats import (
    LayerStatsObserver,
    attention_metrics,
    chunked_layer_stats,
    overlap_matrix,
    reference_layer_stats,
    sample_rows,
)
from indexcache.losses import TeacherInputs
from indexcache.model import IndexCacheModel
from indexcache.model.tiny import tiny_model
from indexcache.pattern import IndexCachePattern


def worked_example() -> tuple[TeacherInputs, torch.Tensor]:
    """One sequence of 4 tokens, 2 heads, K = 2.

    Head 0 scores key s with log(s + 1), so its row t is (1, 2, ..., t + 1) / sum; head 1 scores every key 0
    (uniform). Rows 0 and 1 see at most K keys (not sparse); rows 2 and 3 are:
      row 2: p = mean((1,2,3)/6, (1,1,1)/3) = (1/4, 1/3, 5/12); dense top-2 {2, 1}; attends {0, 2}
             recall 1/2, coverage 1/4 + 5/12 = 2/3
      row 3: p = mean((1,2,3,4)/10, (1,1,1,1)/4) = (.175, .225, .275, .325); dense top-2 {3, 2}; attends {3, 2}
             recall 1, coverage .6
    Layer: recall (1/2 + 1) / 2 = 3/4, coverage (2/3 + .6) / 2 = 19/30.
    """
    key = torch.log(torch.arange(1.0, 5.0, dtype=torch.float64)).reshape(1, 1, 4, 1)
    query = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 2, 1, 1).expand(1, 2, 4, 1)
    topk = torch.tensor([[[0, -1], [0, 1], [0, 2], [3, 2]]])
    return TeacherInputs(query=query.contiguous(), key=key, scaling=1.0), topk


def test_recall_and_coverage_equal_the_hand_computed_values():
    teacher, topk = worked_example()
    for stats in (reference_layer_stats(teacher, topk, None)[0], chunked_layer_stats(teacher, topk, None, 1)[0]):
        assert stats.num_rows == 2
        assert stats.recall == pytest.approx(3 / 4, abs=1e-12)
        assert stats.coverage == pytest.approx(19 / 30, abs=1e-12)


def random_case(seed: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, seq, dim, topk = 3, 4, 2, 37, 8, 5
    query = torch.randn(batch, heads, seq, dim, generator=generator, dtype=dtype) * 2
    key = torch.randn(batch, kv_heads, seq, dim, generator=generator, dtype=dtype) * 2
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, 30:] = 0  # right padding
    # A random attended set per row among its visible keys (-1 where fewer are visible), as a top-k would give.
    indices = torch.full((batch, seq, topk), -1, dtype=torch.long)
    for b in range(batch):
        for t in range(seq):
            visible = [s for s in range(t + 1) if mask[b, s]]
            chosen = torch.randperm(len(visible), generator=generator)[:topk].tolist()
            indices[b, t, : len(chosen)] = torch.tensor([visible[i] for i in chosen], dtype=torch.long)
    return TeacherInputs(query=query, key=key, scaling=dim**-0.5), indices, mask


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_stats_equal_the_materialised_reference_on_fresh_random_inputs(chunk_size):
    for seed in range(3):
        teacher, indices, mask = random_case(seed)
        expected, dense_topk = reference_layer_stats(teacher, indices, mask)
        positions = sample_rows(37, 5, 12)
        got, sampled = chunked_layer_stats(teacher, indices, mask, chunk_size, positions)
        assert got.num_rows == expected.num_rows > 0
        # float64 throughout: the sums agree to round-off (relative 1e-12)
        assert got.recall_sum == pytest.approx(expected.recall_sum, rel=1e-12)
        assert got.coverage_sum == pytest.approx(expected.coverage_sum, rel=1e-12)
        # the sampled dense top-k rows are the reference's own top-k sets (-1 rows where not sparse)
        for b in range(3):
            for i, t in enumerate(positions.tolist()):
                assert set(sampled[b, i].tolist()) == set(dense_topk[b, t].tolist())


def test_chunked_stats_in_float32_stay_within_float32_round_off():
    teacher, indices, mask = random_case(7, torch.float32)
    expected, _ = reference_layer_stats(teacher, indices, mask)
    got, _ = chunked_layer_stats(teacher, indices, mask, 8)
    assert got.coverage == pytest.approx(expected.coverage, rel=1e-5)
    assert got.recall == pytest.approx(expected.recall, abs=1e-6)  # a set count: exact unless a near-tie flips


def test_overlap_matrix_is_the_mean_pairwise_intersection():
    generator = torch.Generator().manual_seed(0)
    layers = [torch.stack([torch.randperm(20, generator=generator)[:4] for _ in range(9)]) for _ in range(3)]
    layers[1][2] = -1  # a row that is not sparse in layer 1
    matrix = overlap_matrix(layers)
    for a in range(3):
        for b in range(3):
            rows = [r for r in range(9) if layers[a][r, 0] >= 0 and layers[b][r, 0] >= 0]
            expected = sum(len(set(layers[a][r].tolist()) & set(layers[b][r].tolist())) / 4 for r in rows) / len(rows)
            assert matrix[a, b].item() == pytest.approx(expected)
    assert torch.allclose(matrix.diagonal(), torch.ones(3, dtype=torch.float64))


def test_observer_pairs_each_layer_with_its_f_layers_top_k_in_a_real_forward():
    model = IndexCacheModel(tiny_model("llama", seed=1, num_hidden_layers=4), IndexCachePattern("FSFS"), mode="sparse")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    captured = {}

    def capture(layer, selection, teacher, attention_mask):
        captured[layer] = (selection, teacher, attention_mask)

    observer = LayerStatsObserver(chunk_size=5)
    with torch.no_grad():
        model(ids, mask, mode="sparse", observer=lambda *args: (capture(*args), observer(*args)))
    assert sorted(captured) == [0, 1, 2, 3]
    for layer, (selection, teacher, attention_mask) in captured.items():
        assert selection.layer_idx == model.pattern.owner(layer), "an S layer is scored on its F layer's top-k"
        expected, _ = reference_layer_stats(teacher, selection.topk_indices, attention_mask)
        assert observer.stats[layer].recall == pytest.approx(expected.recall, rel=1e-6)
        assert observer.stats[layer].coverage == pytest.approx(expected.coverage, rel=1e-5)
    metrics = attention_metrics(model, ids, mask)
    assert set(metrics) >= {f"indexcache/{m}/layer_{i}" for m in ("recall", "coverage") for i in range(4)}
    worst = int(metrics["indexcache/furthest_layer"])
    assert metrics["indexcache/furthest_layer_coverage"] == min(
        metrics[f"indexcache/coverage/layer_{i}"] for i in range(4)
    )
    assert metrics[f"indexcache/coverage/layer_{worst}"] == metrics["indexcache/furthest_layer_coverage"]
    assert all(0.0 <= v <= 1.0 + 1e-6 for k, v in metrics.items() if "layer_" in k and not math.isnan(v))
