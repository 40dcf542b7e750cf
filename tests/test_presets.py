"""The real presets (GLM-5, GLM-5.2, DeepSeek-V3.2, GLM-4.7-Flash -> DSA): they compose and pass every start-up check
on CPU, and the model each would train, built on the meta device from its checkpoint's real config.json, has the
layer types the preset assumes.

The config.json fixtures under tests/fixtures/configs/ copy the public checkpoints' architecture values; where
each came from is in tests/fixtures/configs/SOURCES.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from indexcache.config import ConfigError, RunConfig, presets
from indexcache.conversion.glm4_moe_lite import glm_moe_dsa_config
from indexcache.conversion.sources import index_config
from indexcache.model import IndexCacheModel, get_family
from indexcache.model.context import SharedIndexer
from indexcache.pattern import IndexCachePattern

FIXTURES = Path(__file__).parent / "fixtures" / "configs"

# preset -> the fixture folder holding its source checkpoint's config.json
PRESET_SOURCES = {
    "glm5_indexcache": "glm5",
    "glm52_indexcache": "glm52",
    "deepseek_v32_indexcache": "deepseek_v32",
    "glm47flash_to_dsa": "glm47flash",
}

# What each preset's model is, from the public model cards and configs (not from the fixtures themselves).
EXPECTED = {
    "glm5_indexcache": {
        "layers": 78,
        "dense_mlp": 3,  # first_k_dense_replace
        "source_full": list(range(78)),  # GLM-5 carries an indexer on every layer
        "run_full": IndexCachePattern.uniform(78, 4, 2).full_layers,
        "params_billion": 744,
    },
    "glm52_indexcache": {
        "layers": 78,
        "dense_mlp": 3,
        "source_full": IndexCachePattern.uniform(78, 4, 3).full_layers,  # IndexShare: freq 4, offset 3
        "run_full": IndexCachePattern.uniform(78, 4, 3).full_layers,  # pattern=source keeps it
        "params_billion": 744,
    },
    "deepseek_v32_indexcache": {
        "layers": 61,
        "dense_mlp": 3,
        "source_full": list(range(61)),
        "run_full": IndexCachePattern.uniform(61, 4, 2).full_layers,
        "params_billion": 672,  # 671B without the MTP layer, plus 0.85B of indexers
    },
    "glm47flash_to_dsa": {
        "layers": 47,
        "dense_mlp": 1,
        "source_full": list(range(47)),  # conversion adds a fresh indexer to every layer
        "run_full": IndexCachePattern.uniform(47, 4, 2).full_layers,
        "params_billion": 30,
    },
}


def compose_preset(compose: Callable[..., RunConfig], preset: str, tmp_path: Path) -> RunConfig:
    """The preset with what only a user can give: its checkpoint (the fixture folder), data and a run dir."""
    return compose(
        f"conf={preset}",
        f"model.source={FIXTURES / PRESET_SOURCES[preset]}",
        f"data.sources=[{FIXTURES}]",
        f"run_dir={tmp_path / 'run'}",
    )


def source_config(preset: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(FIXTURES / PRESET_SOURCES[preset])


def trained_config(preset: str, cfg: RunConfig) -> PretrainedConfig:
    """The config of the DSA model the run trains: the source's, or its conversion's (GLM-4.7-Flash)."""
    config = source_config(preset)
    if config.model_type == "glm4_moe_lite":
        return glm_moe_dsa_config(config, index_config(cfg.model))
    return config


def meta_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The whole model with every tensor on the meta device: architecture only, no memory."""
    with torch.device("meta"):
        return get_family(config.model_type).build(config)


def test_every_real_preset_is_covered() -> None:
    assert set(presets()) - {"tiny"} == set(PRESET_SOURCES)


@pytest.mark.parametrize("preset", sorted(PRESET_SOURCES))
def test_preset_composes_and_validates_on_cpu(compose: Callable[..., RunConfig], preset: str, tmp_path: Path) -> None:
    cfg = compose_preset(compose, preset, tmp_path)
    assert cfg.name == preset
    assert cfg.model.source == str(FIXTURES / PRESET_SOURCES[preset])
    assert cfg.model.dtype == "bfloat16"
    assert cfg.deepspeed.zero_stage == 3
    assert str(cfg.deepspeed.bf16).lower() == "true"
    assert cfg.logger.wandb.mode == "online"
    assert list(cfg.stage) == ["warmup", "sparse"]
    assert [stage.mode for stage in cfg.stage.values()] == ["dense", "sparse"]
    assert not cfg.stage["warmup"].train_base
    # The paper's context caps every preset; top-k must stay below it or the sparse stage equals the dense one.
    assert cfg.model.index_topk < cfg.train.seq_len <= 204_800
    assert cfg.export.enabled


def test_only_the_conversion_preset_trains_the_base(compose: Callable[..., RunConfig], tmp_path: Path) -> None:
    trains_base = {
        preset for preset in PRESET_SOURCES if compose_preset(compose, preset, tmp_path).stage["sparse"].train_base
    }
    assert trains_base == {"glm47flash_to_dsa"}


def test_glm52_preset_takes_the_source_pattern(compose: Callable[..., RunConfig], tmp_path: Path) -> None:
    assert compose_preset(compose, "glm52_indexcache", tmp_path).pattern.kind == "source"


@pytest.mark.parametrize("preset", sorted(PRESET_SOURCES))
def test_preset_requires_model_source(compose: Callable[..., RunConfig], preset: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.source is required"):
        compose(f"conf={preset}", f"data.sources=[{FIXTURES}]", f"run_dir={tmp_path / 'run'}")


@pytest.mark.parametrize("preset", sorted(PRESET_SOURCES))
def test_preset_model_skeleton_has_the_expected_layers(
    compose: Callable[..., RunConfig], preset: str, tmp_path: Path
) -> None:
    cfg = compose_preset(compose, preset, tmp_path)
    expected = EXPECTED[preset]
    config = trained_config(preset, cfg)
    model = meta_skeleton(config)
    layers = model.model.layers

    assert len(layers) == config.num_hidden_layers == expected["layers"]
    # Every decoder layer is a DSA layer: the pattern has one character per layer.
    assert len(get_family(config.model_type).dsa_attentions(model)) == expected["layers"]
    moe = [type(layer.mlp).__name__.endswith("MoE") for layer in layers]
    assert moe == [False] * expected["dense_mlp"] + [True] * (expected["layers"] - expected["dense_mlp"])
    # One MTP layer in the checkpoint, not built by transformers: exports must copy its tensors untouched.
    assert config.num_nextn_predict_layers == 1
    assert [i for i, layer in enumerate(layers) if layer.self_attn.indexer is not None] == expected["source_full"]
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(expected["params_billion"] * 1e9, rel=0.01)


@pytest.mark.parametrize("preset", sorted(PRESET_SOURCES))
def test_preset_pattern_applies_to_the_skeleton(compose: Callable[..., RunConfig], preset: str, tmp_path: Path) -> None:
    """The run's pattern on the real architecture: F layers keep a trainable indexer, S layers hold no parameters."""
    from indexcache.run import build_pattern

    cfg = compose_preset(compose, preset, tmp_path)
    expected = EXPECTED[preset]
    config = trained_config(preset, cfg)
    source_dict = json.loads((FIXTURES / PRESET_SOURCES[preset] / "config.json").read_text())
    pattern = build_pattern(cfg.pattern, expected["layers"], source_dict)
    assert pattern.full_layers == expected["run_full"]

    model = IndexCacheModel(meta_skeleton(config), pattern=pattern)
    assert model.num_dsa_layers == expected["layers"]
    indexer_layers = sorted({int(name.split(".")[2]) for name, _ in model.indexer_parameters()})
    assert indexer_layers == expected["run_full"]
    tensors_per_indexer = 5  # wq_b, wk, k_norm.weight, k_norm.bias, weights_proj
    assert len(model.indexer_parameters()) == tensors_per_indexer * len(expected["run_full"])
    for layer_idx in pattern.shared_layers:
        indexer = model.hf_model.model.layers[layer_idx].self_attn.indexer
        assert indexer is None or (isinstance(indexer, SharedIndexer) and not list(indexer.parameters()))
