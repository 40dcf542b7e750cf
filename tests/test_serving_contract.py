"""The serving contract per engine: the layer types each engine derives from an export's config.json (issue 13).

Each resolver below restates one engine's documented rule and nothing more; the tests run them on real exports
(tiny glm_moe_dsa and deepseek_v32 hub checkpoints with an MTP layer, uniform and non-uniform patterns) and require
the trained pattern, or, where the engine's rule cannot express the pattern, a model card that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM

from indexcache.export import export_checkpoint
from indexcache.pattern import IndexCachePattern
from tests.test_export import SUMMARY, TINY_DSA, as_bytes, read_export, tiny_glm, trained_indexers, write_hub_source

NUM_LAYERS = 6
FULL, SHARED = "full", "shared"


def transformers_types(config: dict[str, Any]) -> list[str]:
    """transformers 5.23, `GlmMoeDsaConfig.__post_init__` (models/glm_moe_dsa/configuration_glm_moe_dsa.py):
    `indexer_types` if given; else `index_topk_pattern` (an F/S string, or a list of types); else layer i is full
    iff max(i - offset + 1, 0) % freq == 0 with freq = max(index_topk_freq or 1, 1) and offset =
    index_skip_topk_offset or 2. `use_index_cache` is not read. `DeepseekV32Config`
    (models/deepseek_v32/configuration_deepseek_v32.py) has none of these keys: every layer runs its own indexer.
    """
    layers = range(config["num_hidden_layers"])
    if config["model_type"] == "deepseek_v32":
        return [FULL for _ in layers]
    if config.get("indexer_types") is not None:
        return list(config["indexer_types"])
    pattern = config.get("index_topk_pattern")
    if pattern is not None:
        return [{"F": FULL, "S": SHARED}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    freq, offset = max(config.get("index_topk_freq", 1), 1), config.get("index_skip_topk_offset", 2)
    return [FULL if max(i - offset + 1, 0) % freq == 0 else SHARED for i in layers]


def vllm_types(config: dict[str, Any], num_mtp_layers: int) -> list[str]:
    """vLLM, vllm/model_executor/models/deepseek_v2.py (`DeepseekV2MLAAttention.__init__`, its IndexCache block,
    which serves both deepseek_v32 and glm_moe_dsa): layer_id skips top-k iff `index_topk_pattern[layer_id] == "S"`
    when a pattern is given (it overrides freq and offset), else iff max(layer_id - offset + 1, 0) % freq != 0 with
    index_topk_freq default 1 and index_skip_topk_offset default 2; MTP layers (layer_id >= num_hidden_layers)
    always build and run their own indexer. The releases that introduced IndexCache (the same block in earlier
    deepseek_v2.py, and vllm/model_executor/models/glm5_next.py) apply all of this only when `use_index_cache` is
    true; the resolver keeps that gate, the stricter of the two.
    """
    num_layers = config["num_hidden_layers"]
    types = []
    for layer_id in range(num_layers + num_mtp_layers):
        skip = False
        if config.get("use_index_cache", False):
            pattern = config.get("index_topk_pattern")
            if pattern is None:
                freq, offset = config.get("index_topk_freq", 1), config.get("index_skip_topk_offset", 2)
                skip = max(layer_id - offset + 1, 0) % freq != 0
            elif 0 <= layer_id < len(pattern):
                skip = pattern[layer_id] == "S"
        is_mtp = layer_id >= num_layers
        types.append(FULL if not skip or is_mtp else SHARED)
    return types


def sglang_types(config: dict[str, Any]) -> list[str]:
    """SGLang's DSA models (python/sglang/srt/models/, the GLM-5 / DeepSeek-V3.2 attention): `indexer_types`
    first, else `index_topk_pattern`, else freq (default 1) and offset (default 2) with the formula above.
    """
    layers = range(config["num_hidden_layers"])
    if config.get("indexer_types") is not None:
        return list(config["indexer_types"])
    pattern = config.get("index_topk_pattern")
    if pattern is not None:
        return [SHARED if pattern[i] == "S" else FULL for i in layers]
    freq, offset = config.get("index_topk_freq", 1), config.get("index_skip_topk_offset", 2)
    return [FULL if max(i - offset + 1, 0) % freq == 0 else SHARED for i in layers]


def megatron_types(config: dict[str, Any]) -> list[str]:
    """Megatron-LM's convention: layers are numbered from 1 (megatron/core/transformer/transformer_block.py builds
    layer i with layer_number = i + 1), and the schedule reads only index_topk_freq and index_skip_topk_offset
    against that number: layer_number n runs its indexer iff max(n - offset, 0) % freq == 0 (GLM-5.2's freq 4,
    offset 3 gives layers 1, 2, 3, 7, 11, ..., 75). Without the keys (freq 1) every layer keeps its indexer.
    """
    freq, offset = config.get("index_topk_freq", 1), config.get("index_skip_topk_offset", 1)
    return [FULL if max(n - offset, 0) % freq == 0 else SHARED for n in range(1, config["num_hidden_layers"] + 1)]


PATTERNS = {
    "uniform freq 2": IndexCachePattern.uniform(NUM_LAYERS, 2),  # FFSFSF
    "uniform freq 4 offset 3 (GLM-5.2 style)": IndexCachePattern.uniform(NUM_LAYERS, 4, 3),  # FFFSSS
    "non-uniform": IndexCachePattern("FSFFSS"),
}


def _deepseek_v32() -> DeepseekV32ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV32ForCausalLM(DeepseekV32Config(**TINY_DSA, num_hidden_layers=NUM_LAYERS)).eval()


FAMILIES = {"glm_moe_dsa": lambda: tiny_glm(NUM_LAYERS), "deepseek_v32": _deepseek_v32}


@pytest.fixture(scope="module", params=list(FAMILIES))
def source(request, tmp_path_factory):
    model_type = request.param
    directory = tmp_path_factory.mktemp(model_type) / "source"
    return model_type, write_hub_source(directory, FAMILIES[model_type](), sharded=True, mtp=True)


@pytest.fixture(scope="module", params=list(PATTERNS))
def export(request, source, tmp_path_factory) -> tuple[str, Any, IndexCachePattern, Path]:
    model_type, hub = source
    pattern = PATTERNS[request.param]
    target = tmp_path_factory.mktemp("export") / "export"
    export_checkpoint(hub.directory, target, pattern, model_type, trained_indexers(hub, pattern), SUMMARY)
    return model_type, hub, pattern, target


def _check(engine: str, derived: list[str], trained: list[str], card: str) -> None:
    """The engine runs the trained pattern, or the model card states that it cannot."""
    if derived != trained:
        assert f"{engine}: cannot express this pattern" in card, (engine, derived, trained)


def test_every_engine_derives_the_trained_pattern_or_the_card_says_it_cannot(export):
    model_type, _, pattern, target = export
    config = json.loads((target / "config.json").read_text())
    card = (target / "README.md").read_text()
    trained = pattern.to_indexer_types()
    _check("transformers 5.23", transformers_types(config), trained, card)
    _check("vLLM", vllm_types(config, num_mtp_layers=1), [*trained, FULL], card)
    _check("SGLang", sglang_types(config), trained, card)
    _check("Megatron-LM convention", megatron_types(config), trained, card)
    # The limits the card states are exactly the engines that cannot run this pattern, and only those.
    uniform = pattern.uniform_params() is not None
    assert ("transformers 5.23: cannot express" in card) == (model_type == "deepseek_v32")
    assert ("Megatron-LM convention: cannot express" in card) == (not uniform)
    assert (megatron_types(config) == trained) == uniform


def test_the_transformers_resolver_matches_the_installed_transformers(export):
    model_type, _, pattern, target = export
    config = json.loads((target / "config.json").read_text())
    expected = transformers_types(config)
    if model_type == "glm_moe_dsa":
        assert AutoConfig.from_pretrained(target).indexer_types == expected == pattern.to_indexer_types()
    else:
        model = AutoModelForCausalLM.from_pretrained(target)
        assert [FULL if layer.self_attn.indexer is not None else SHARED for layer in model.model.layers] == expected


def test_mtp_layer_tensors_are_kept_byte_for_byte(export):
    _, hub, _, target = export
    exported = read_export(target)
    assert any(".self_attn.indexer." in name for name in hub.mtp_names)  # vLLM runs the MTP layer's own indexer
    for name in hub.mtp_names:
        assert as_bytes(exported[name]) == as_bytes(hub.stored[name]), name


def test_resolvers_follow_their_rules_on_hand_written_configs():
    # Each rule on a config an export would never write, so a resolver that ignored a key would be caught.
    base = {"model_type": "glm_moe_dsa", "num_hidden_layers": 4}
    both = {**base, "indexer_types": [FULL, FULL, FULL, SHARED], "index_topk_pattern": "FSSS", "use_index_cache": True}
    assert transformers_types(both) == sglang_types(both) == [FULL, FULL, FULL, SHARED]  # indexer_types wins
    assert vllm_types(both, 0) == [FULL, SHARED, SHARED, SHARED]  # vLLM reads the pattern, not indexer_types
    assert vllm_types({**both, "use_index_cache": False}, 1) == [FULL] * 5
    assert vllm_types({**base, "use_index_cache": True, "index_topk_freq": 2}, 1) == [FULL, FULL, SHARED, FULL, FULL]
    schedule = {**base, "index_topk_freq": 2, "index_skip_topk_offset": 3}
    assert transformers_types(schedule) == sglang_types(schedule) == [FULL, FULL, FULL, SHARED]
    assert megatron_types(schedule) == [FULL, FULL, FULL, SHARED]  # 1-indexed numbers, same keys, same layers
    glm52 = {"num_hidden_layers": 78, "index_topk_freq": 4, "index_skip_topk_offset": 3}
    numbers = [n + 1 for n, kind in enumerate(megatron_types(glm52)) if kind == FULL]
    assert numbers[:5] == [1, 2, 3, 7, 11] and numbers[-1] == 75 and len(numbers) == 21
