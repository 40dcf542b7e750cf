"""IndexCachePattern: the serving engines' uniform schedule, parsing errors, groups and round trips."""

from __future__ import annotations

import itertools

import pytest
from transformers import GlmMoeDsaConfig

from indexcache.pattern import IndexCachePattern


def test_uniform_schedule_matches_stock_transformers_config():
    # The real config class derives indexer_types from the same two keys the engines read; any drift between our
    # formula and theirs would train one set of layers and serve another.
    for num_layers, freq, offset in itertools.product(range(1, 101), range(1, 9), range(1, 5)):
        config = GlmMoeDsaConfig(num_hidden_layers=num_layers, index_topk_freq=freq, index_skip_topk_offset=offset)
        ours = IndexCachePattern.uniform(num_layers, freq, offset).to_indexer_types()
        assert ours == config.indexer_types, (num_layers, freq, offset)


def test_glm5_freq4_keeps_21_of_78_layers():
    pattern = IndexCachePattern.uniform(78, 4)
    assert pattern.value.startswith("FFSSSFSSSF")
    assert len(pattern.full_layers) == 21
    assert pattern.full_layers[:4] == [0, 1, 5, 9]
    assert pattern.retention == pytest.approx(21 / 78)


@pytest.mark.parametrize(
    ("text", "num_layers", "message"),
    [
        ("FSF", 5, "has 3 characters but the model has 5 DSA layers"),
        ("SFFFF", 5, "starts with 'S' at position 0"),
        ("FFXFF", 5, "illegal character 'X' at position 2"),
        ("  ", 5, "empty"),
    ],
)
def test_parse_errors_are_one_line_and_name_the_place(text, num_layers, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        IndexCachePattern.parse(text, num_layers)
    assert "\n" not in str(excinfo.value)


def test_parse_normalises_case_and_whitespace():
    assert IndexCachePattern.parse(" fsffs\n", 5) == IndexCachePattern("FSFFS")


def test_groups_owner_retention_on_a_non_uniform_pattern():
    pattern = IndexCachePattern("FSFFS")
    assert pattern.groups == {0: [0, 1], 2: [2], 3: [3, 4]}
    assert [pattern.owner(layer) for layer in range(5)] == [0, 0, 2, 3, 3]
    assert pattern.full_layers == [0, 2, 3]
    assert pattern.shared_layers == [1, 4]
    assert pattern.retention == pytest.approx(0.6)
    assert pattern.to_indexer_types() == ["full", "shared", "full", "full", "shared"]
    assert IndexCachePattern.from_indexer_types(pattern.to_indexer_types()) == pattern
    assert IndexCachePattern.parse(str(pattern), len(pattern)) == pattern
    with pytest.raises(IndexError, match="outside"):
        pattern.owner(-1)


def test_groups_partition_the_layers_for_every_uniform_schedule():
    for num_layers, freq, offset in itertools.product((1, 2, 7, 30, 78), range(1, 9), range(1, 5)):
        pattern = IndexCachePattern.uniform(num_layers, freq, offset)
        served = [layer for group in pattern.groups.values() for layer in group]
        assert served == list(range(num_layers))
        for owner, group in pattern.groups.items():
            assert group[0] == owner and pattern.is_full(owner)
            assert all(not pattern.is_full(layer) and pattern.owner(layer) == owner for layer in group[1:])
        assert pattern.retention == len(pattern.groups) / num_layers


def test_uniform_params_reproduce_every_uniform_schedule():
    for num_layers, freq, offset in itertools.product((1, 2, 3, 5, 8, 13, 30, 78), range(1, 9), range(1, 5)):
        pattern = IndexCachePattern.uniform(num_layers, freq, offset)
        params = pattern.uniform_params()
        assert params is not None
        assert IndexCachePattern.uniform(num_layers, *params) == pattern
        assert params[0] <= freq  # the smallest reproducing freq is reported


def test_uniform_params_is_none_exactly_when_no_schedule_fits():
    # Every 7-layer pattern, against a brute force over a wider (freq, offset) range than uniform_params searches.
    num_layers = 7
    for tail in itertools.product("FS", repeat=num_layers - 1):
        pattern = IndexCachePattern("F" + "".join(tail))
        fits = {
            (freq, offset)
            for freq, offset in itertools.product(range(1, 2 * num_layers), range(1, 2 * num_layers))
            if IndexCachePattern.uniform(num_layers, freq, offset) == pattern
        }
        params = pattern.uniform_params()
        assert (params is None) == (not fits), pattern
        if params is not None:
            assert params in fits
    assert IndexCachePattern("FFSFS").uniform_params() == (2, 2)
    assert IndexCachePattern("FFFFF").uniform_params() == (1, 2)
    assert IndexCachePattern("FSFFS").uniform_params() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 4, "freq": 0}, "pattern.freq=0"),
        ({"num_layers": 4, "freq": 2, "offset": 0}, "pattern.offset=0"),
        ({"num_layers": 0, "freq": 2}, "num_layers=0"),
    ],
)
def test_uniform_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexCachePattern.uniform(**kwargs)


def test_from_indexer_types_rejects_unknown_kinds():
    with pytest.raises(ValueError, match=r"indexer_types\[1\]='dense'"):
        IndexCachePattern.from_indexer_types(["full", "dense"])
