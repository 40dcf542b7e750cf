"""Export and validator on tiny stock transformers checkpoints written in the hub layout (CPU, seconds).

Sources are built like the real GLM-5 / DeepSeek-V3.2 repositories: one tensor per expert (what `save_pretrained`
writes for the fused expert parameters in transformers 5.23), BF16 weights with the router's correction bias in
F32, several shards with an index, and an MTP layer `model.layers.{num_hidden_layers}.*` that the transformers
model does not build.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    GlmMoeDsaConfig,
    GlmMoeDsaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

import indexcache.export as export_module
from indexcache.export import ExportError, ExportExistsError, export_checkpoint
from indexcache.pattern import IndexCachePattern
from indexcache.validate_export import INDEXER_PARTS, ExportValidationError, main, validate_export

TINY_DSA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=4,  # well below the test sequence length, so the indexers decide what each layer attends to
    first_k_dense_replace=1,
    max_position_embeddings=64,
)
NUM_LAYERS = 5
PATTERN = IndexCachePattern("FSFFS")  # not uniform: no (freq, offset) reproduces it
SUMMARY = {"stage": "sparse", "steps": 12, "metrics": {"eval/kl": 0.25, "eval/lm_loss": 3.5}}


@dataclass
class Source:
    directory: Path
    model: PreTrainedModel  # the fp32 model the BF16 checkpoint was written from
    stored: dict[str, torch.Tensor]  # every tensor of the checkpoint, as stored
    mtp_names: list[str]


def _indexer(layer: int, part: str) -> str:
    return f"model.layers.{layer}.self_attn.indexer.{part}"


def _shard_of(name: str, num_layers: int) -> str:
    """Embeddings and the first layers, then the rest with the head, then the MTP layer on its own."""
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    if layer is None:
        index = 1 if name.startswith(("model.norm", "lm_head")) else 0
    else:
        index = 0 if layer < 2 else 1 if layer < num_layers else 2
    return f"model-{index + 1:05d}-of-00003.safetensors"


def write_hub_source(directory: Path, model: PreTrainedModel, *, sharded: bool, mtp: bool) -> Source:
    """Write `model` as a BF16 hub checkpoint (per-expert tensors), optionally sharded and with an MTP layer."""
    num_layers = model.config.num_hidden_layers
    scratch = directory.with_name(directory.name + "-save_pretrained")
    model.save_pretrained(scratch)  # transformers 5.23 writes the hub layout: mlp.experts.{e}.{gate,up,down}_proj
    hub = load_file(scratch / "model.safetensors")
    shutil.rmtree(scratch)

    generator = torch.Generator().manual_seed(1)
    mtp_tensors = {}
    if mtp:  # a full decoder layer plus the MTP projections, with values of their own
        for name, value in hub.items():
            if name.startswith("model.layers.1."):
                mtp_name = name.replace("model.layers.1.", f"model.layers.{num_layers}.")
                mtp_tensors[mtp_name] = torch.randn(value.shape, generator=generator)
        hidden = model.config.hidden_size
        for name, shape in [("eh_proj.weight", (hidden, 2 * hidden)), ("enorm.weight", (hidden,))]:
            mtp_tensors[f"model.layers.{num_layers}.{name}"] = torch.randn(shape, generator=generator)
    stored = {
        # DeepSeek-style checkpoints keep the router's correction bias in F32 next to BF16 weights.
        name: value if name.endswith("e_score_correction_bias") else value.to(torch.bfloat16)
        for name, value in {**hub, **mtp_tensors}.items()
    }

    directory.mkdir()
    if sharded:
        shards: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in stored.items():
            shards.setdefault(_shard_of(name, num_layers), {})[name] = value
        for shard_name, tensors in shards.items():
            save_file(tensors, directory / shard_name, metadata={"format": "pt"})
        weight_map = {name: _shard_of(name, num_layers) for name in sorted(stored)}
        total = sum(value.numel() * value.element_size() for value in stored.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.dtype = torch.bfloat16  # what the stored weights are, as in a hub config
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return Source(directory, model, stored, sorted(mtp_tensors))


def tiny_glm(num_layers: int = NUM_LAYERS) -> GlmMoeDsaForCausalLM:
    # index_topk_freq=1 marks the source as all-F (every layer has an indexer) the way a hub config would.
    config = GlmMoeDsaConfig(**TINY_DSA, num_hidden_layers=num_layers, index_topk_freq=1)
    torch.manual_seed(0)
    return GlmMoeDsaForCausalLM(config).eval()


def trained_indexers(source: Source, pattern: IndexCachePattern, seed: int = 2) -> dict[str, torch.Tensor]:
    """Simulated training: the F layers' fp32 indexer weights moved well away from the source's."""
    generator = torch.Generator().manual_seed(seed)
    state = source.model.state_dict()
    names = [_indexer(layer, part) for layer in pattern.full_layers for part in INDEXER_PARTS]
    return {name: state[name] + torch.randn(state[name].shape, generator=generator) for name in names}


def read_export(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library (not the code under test)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def stock_reference(source: Source, pattern: IndexCachePattern, trained: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A stock model for `pattern` holding exactly the values the export should store, built without the export."""
    config = GlmMoeDsaConfig(**TINY_DSA, num_hidden_layers=NUM_LAYERS, indexer_types=pattern.to_indexer_types())
    model = GlmMoeDsaForCausalLM(config).eval()
    weights = {**source.model.state_dict(), **trained}
    state = {
        name: weights[name] if name.endswith("e_score_correction_bias") else weights[name].to(torch.bfloat16).float()
        for name in model.state_dict()
    }
    model.load_state_dict(state, strict=True)
    return model


@contextmanager
def transformers_warnings():
    """Collect the WARNING records of transformers' loggers (they do not propagate to the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        yield records
    finally:
        library_logger.removeHandler(handler)


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def glm_source(tmp_path_factory) -> Source:
    return write_hub_source(tmp_path_factory.mktemp("glm") / "source", tiny_glm(), sharded=True, mtp=True)


@pytest.fixture(scope="module")
def glm_export(glm_source, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    trained = trained_indexers(glm_source, PATTERN)
    target = tmp_path_factory.mktemp("glm_export") / "export"
    assert export_checkpoint(glm_source.directory, target, PATTERN, "glm_moe_dsa", trained, SUMMARY) == target
    return target, trained


def test_source_fixture_is_a_hub_checkpoint_that_stock_transformers_loads(glm_source):
    shards = sorted(path.name for path in glm_source.directory.glob("*.safetensors"))
    assert len(shards) == 3
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in glm_source.stored
    assert not any("gate_up_proj" in name for name in glm_source.stored)
    assert glm_source.stored["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert glm_source.stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert any(name.startswith(f"model.layers.{NUM_LAYERS}.self_attn.indexer.") for name in glm_source.mtp_names)
    _, info = AutoModelForCausalLM.from_pretrained(glm_source.directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # Stock transformers ignores only `model.layers.78.*` (GLM-5's MTP layer); the tiny model's MTP layer is
    # reported, and nothing else is.
    assert info["unexpected_keys"]
    assert all(key.startswith(f"model.layers.{NUM_LAYERS}.") for key in info["unexpected_keys"])


def test_glm_export_loads_in_stock_transformers_with_the_trained_indexers(glm_source, glm_export):
    target, trained = glm_export
    with transformers_warnings() as warnings:
        model, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(key.startswith(f"model.layers.{NUM_LAYERS}.") for key in info["unexpected_keys"])  # MTP only
    # The one warning is the load report listing those MTP keys (this also shows the warning capture works).
    assert len(warnings) == 1
    report_keys = re.findall(r"model\.layers\.\d+\.\S+", warnings[0].getMessage())
    assert report_keys and all(key.startswith(f"model.layers.{NUM_LAYERS}.") for key in report_keys)
    assert model.config.indexer_types == PATTERN.to_indexer_types()
    assert [layer.self_attn.indexer is not None for layer in model.model.layers] == [c == "F" for c in PATTERN.value]

    input_ids = torch.randint(0, TINY_DSA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids).logits
        expected = stock_reference(glm_source, PATTERN, trained)(input_ids).logits
        untrained = stock_reference(glm_source, PATTERN, {})(input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # The comparison can fail: the trained indexers select other tokens than the source's did.
    assert (untrained - expected).abs().max() > 1e-2


def test_glm_export_tensors_config_and_record(glm_source, glm_export):
    target, trained = glm_export
    exported = read_export(target)
    for layer in range(NUM_LAYERS):
        for part in INDEXER_PARTS:
            name = _indexer(layer, part)
            if PATTERN.is_full(layer):
                assert exported[name].dtype == torch.bfloat16
                assert torch.equal(exported[name], trained[name].to(torch.bfloat16))
                assert not torch.equal(exported[name], glm_source.stored[name])
            else:
                assert name not in exported
    kept = {name for name in glm_source.stored if ".self_attn.indexer." not in name or name in glm_source.mtp_names}
    assert kept | {_indexer(layer, part) for layer in PATTERN.full_layers for part in INDEXER_PARTS} == set(exported)
    for name in kept:  # MTP layer (its indexer included), experts one by one, F32 bias: all byte-identical
        assert exported[name].dtype == glm_source.stored[name].dtype, name
        assert as_bytes(exported[name]) == as_bytes(glm_source.stored[name]), name

    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    for name, shard_name in index["weight_map"].items():
        assert name in load_file(target / shard_name)
    assert set(index["weight_map"]) == set(exported)
    # The MTP-only shard has no pattern-layer indexer: it is hard-linked, not rewritten.
    assert (target / "model-00003-of-00003.safetensors").samefile(
        glm_source.directory / "model-00003-of-00003.safetensors"
    )

    source_config = json.loads((glm_source.directory / "config.json").read_text())
    config = json.loads((target / "config.json").read_text())
    assert config["indexer_types"] == PATTERN.to_indexer_types()
    assert config["index_topk_pattern"] == "FSFFS" and config["use_index_cache"] is True
    assert "index_topk_freq" not in config and "index_skip_topk_offset" not in config  # the pattern is not uniform
    assert source_config["index_topk_freq"] == 1
    changed = {"indexer_types", "index_topk_pattern", "use_index_cache", "index_topk_freq"}
    assert {k: v for k, v in config.items() if k not in changed} == {
        k: v for k, v in source_config.items() if k not in changed
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (target / name).read_bytes() == (glm_source.directory / name).read_bytes()

    record = json.loads((target / "indexcache.json").read_text())
    assert record["pattern"] == "FSFFS" and record["retention"] == pytest.approx(0.6)
    assert record["groups"] == {"0": [0, 1], "2": [2], "3": [3, 4]} and record["uniform"] is None
    assert record["source"]["path"] == str(glm_source.directory.resolve())
    assert len(record["source"]["config_sha256"]) == 64
    assert record["metrics"] == SUMMARY["metrics"] and record["summary"] == SUMMARY
    assert "`FSFFS`" in (target / "README.md").read_text()
    assert leftovers(target.parent) == ["export"]  # no temporary directory left beside it


def test_glm5_depth_export_loads_with_no_load_warning(tmp_path):
    # At GLM-5's 78 layers the MTP layer is model.layers.78, which stock transformers ignores by name: the export
    # must then load with no missing, unexpected or mismatched key and no warning at all.
    model = tiny_glm(78)
    source = write_hub_source(tmp_path / "source", model, sharded=True, mtp=True)
    pattern = IndexCachePattern.uniform(78, 4)
    target = export_checkpoint(
        source.directory, tmp_path / "export", pattern, "glm_moe_dsa", trained_indexers(source, pattern), SUMMARY
    )
    config = json.loads((target / "config.json").read_text())
    assert (config["index_topk_freq"], config["index_skip_topk_offset"]) == (4, 2)  # uniform: kept, reproducing
    with transformers_warnings() as warnings:
        loaded, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert [record.getMessage() for record in warnings] == []
    assert sum(layer.self_attn.indexer is not None for layer in loaded.model.layers) == 21


def test_deepseek_v32_export_keeps_shared_indexers(tmp_path):
    config = DeepseekV32Config(**TINY_DSA, num_hidden_layers=4)
    torch.manual_seed(0)
    source = write_hub_source(tmp_path / "source", DeepseekV32ForCausalLM(config), sharded=False, mtp=False)
    pattern = IndexCachePattern.uniform(4, 2)  # FFSF
    trained = trained_indexers(source, pattern)
    target = export_checkpoint(source.directory, tmp_path / "export", pattern, "deepseek_v32", trained, SUMMARY)

    # A single-file source stays single-file (no index), and the side files come along.
    files = ["README.md", "config.json", "generation_config.json", "indexcache.json", "indexcache.tensors.json"]
    files.append("model.safetensors")
    assert leftovers(target) == [*files, "tokenizer.json", "tokenizer_config.json"]
    exported = read_export(target)
    assert set(exported) == set(source.stored)
    for name, value in source.stored.items():
        if name in trained:
            assert torch.equal(exported[name], trained[name].to(value.dtype))
        else:  # S-layer indexers (layer 2) included
            assert as_bytes(exported[name]) == as_bytes(value), name
    config = json.loads((target / "config.json").read_text())
    assert config["use_index_cache"] is True and config["index_topk_pattern"] == "FFSF"
    assert (config["index_topk_freq"], config["index_skip_topk_offset"]) == (2, 2)
    loaded, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True, dtype=torch.float32)
    assert isinstance(loaded, DeepseekV32ForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(
        loaded.model.layers[1].self_attn.indexer.wk.weight,
        trained[_indexer(1, "wk.weight")].to(torch.bfloat16).float(),
        atol=0,
        rtol=0,
    )


def test_dense_conversion_export_adds_the_trained_indexers(tmp_path):
    # A Llama source has no indexer: the F layers' trained ones are added beside their layer, in its dtype.
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    source = write_hub_source(tmp_path / "source", LlamaForCausalLM(config), sharded=False, mtp=False)
    pattern = IndexCachePattern("FSF")
    shapes = {"wq_b.weight": (64, 32), "wk.weight": (16, 32), "k_norm.weight": (16,), "k_norm.bias": (16,)}
    shapes["weights_proj.weight"] = (4, 32)
    trained = {_indexer(layer, part): torch.randn(shape) for layer in (0, 2) for part, shape in shapes.items()}
    target = export_checkpoint(source.directory, tmp_path / "export", pattern, "llama", trained, SUMMARY)
    exported = read_export(target)
    assert set(exported) == set(source.stored) | set(trained)
    for name, value in trained.items():
        assert torch.equal(exported[name], value.to(torch.bfloat16))


BAD_INPUTS = {
    "pattern too short": (dict(pattern=IndexCachePattern("FSFF")), ExportError, "has 4 layers but the source has 5"),
    "string too short": (dict(pattern="FSF"), ValueError, "has 3 characters but the model has 5 DSA layers"),
    "starts with S": (dict(pattern="SFFSS"), ValueError, "starts with 'S' at position 0"),
    "illegal character": (dict(pattern="FSXFS"), ValueError, "illegal character 'X' at position 2"),
    "no safetensors": (dict(source_dir="config-only"), ExportError, "has no model.safetensors or model.safetensors"),
    "trained tensor missing": (
        dict(drop=_indexer(2, "wk.weight")),
        ExportError,
        r"trained tensor model\.layers\.2\.self_attn\.indexer\.wk\.weight is missing",
    ),
    "wrong shape": (
        dict(replace={_indexer(3, "wk.weight"): torch.zeros(31, 64)}),
        ExportError,
        r"has shape \[31, 64\] but the source's is \[32, 64\]",
    ),
    "S-layer tensor given": (
        dict(replace={_indexer(1, "wk.weight"): torch.zeros(32, 64)}),
        ExportError,
        r"model\.layers\.1\.self_attn\.indexer\.wk\.weight is not an F-layer indexer tensor",
    ),
    "non-finite values": (
        dict(replace={_indexer(0, "k_norm.bias"): torch.full((32,), float("nan"))}),
        ExportError,
        "non-finite values",
    ),
    "wrong model_type": (dict(model_type="deepseek_v32"), ExportError, "differs from the source's config.json"),
    "unknown model_type": (dict(model_type="mistral"), ExportError, "has no export rule"),
    "summary not JSON": (dict(summary={"metrics": {"loss": torch.tensor(1.0)}}), ExportError, "not JSON-serialisable"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_leaves_nothing(case, glm_source, tmp_path):
    changes, error, message = BAD_INPUTS[case]
    source_dir = glm_source.directory
    if changes.get("source_dir") == "config-only":
        source_dir = tmp_path / "config-only"
        source_dir.mkdir()
        shutil.copy(glm_source.directory / "config.json", source_dir)
    trained = trained_indexers(glm_source, PATTERN)
    trained.pop(changes.get("drop", ""), None)
    trained.update(changes.get("replace", {}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error, match=message) as excinfo:
        export_checkpoint(
            source_dir,
            out / "export",
            changes.get("pattern", PATTERN),
            changes.get("model_type", "glm_moe_dsa"),
            trained,
            changes.get("summary", SUMMARY),
        )
    assert "\n" not in str(excinfo.value)
    assert leftovers(out) == []


def test_existing_target_is_refused_and_overwrite_replaces_it_atomically(glm_source, tmp_path):
    trained = trained_indexers(glm_source, PATTERN)
    target = export_checkpoint(glm_source.directory, tmp_path / "export", PATTERN, "glm_moe_dsa", trained, SUMMARY)
    before = (target / "config.json").read_bytes()
    with pytest.raises(ExportExistsError, match=f"{re.escape(str(target))} already exists.*overwrite=True") as excinfo:
        export_checkpoint(glm_source.directory, target, PATTERN, "glm_moe_dsa", trained, SUMMARY)
    assert "\n" not in str(excinfo.value)
    assert (target / "config.json").read_bytes() == before

    uniform = IndexCachePattern.uniform(NUM_LAYERS, 2)
    trained = trained_indexers(glm_source, uniform)
    export_checkpoint(glm_source.directory, target, uniform, "glm_moe_dsa", trained, SUMMARY, overwrite=True)
    assert json.loads((target / "config.json").read_text())["index_topk_pattern"] == uniform.value
    validate_export(target, glm_source.directory)
    assert leftovers(tmp_path) == ["export"]  # the old copy and the staging directory are gone


def test_disk_error_mid_write_leaves_nothing(glm_source, tmp_path, monkeypatch):
    # Fault injection: the second rewritten shard hits a full disk after writing part of its bytes.
    real_writer = export_module.write_safetensors
    calls = []

    def failing_writer(path, tensors, metadata):
        calls.append(path.name)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_writer(path, tensors, metadata)

    monkeypatch.setattr(export_module, "write_safetensors", failing_writer)
    trained = trained_indexers(glm_source, PATTERN)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(glm_source.directory, tmp_path / "export", PATTERN, "glm_moe_dsa", trained, SUMMARY)
    assert len(calls) == 2
    assert leftovers(tmp_path) == []


def _rewrite(export: Path, name: str, value: torch.Tensor | None) -> None:
    """Replace (or with None, delete) one tensor of an export, keeping its index self-consistent."""
    index_path = export / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = export / index["weight_map"][name]
    tensors = load_file(shard)
    if value is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = value
    shard.unlink()  # it may be hard-linked to the source
    save_file(tensors, shard, metadata={"format": "pt"})
    index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in read_export(export).values())
    index_path.write_text(json.dumps(index))


def _set_config(export: Path, key: str, value) -> None:
    config = json.loads((export / "config.json").read_text())
    config[key] = value
    (export / "config.json").write_text(json.dumps(config))


TAMPERING = {
    "missing F tensor": (
        lambda export: _rewrite(export, _indexer(2, "wk.weight"), None),
        r"F layer 2 lacks model\.layers\.2\.self_attn\.indexer\.wk\.weight",
    ),
    "wrong dtype": (
        lambda export: _rewrite(export, "model.layers.0.mlp.gate_proj.weight", torch.zeros(128, 64)),
        r"model\.layers\.0\.mlp\.gate_proj\.weight is F32\[128, 64\] in the export, BF16\[128, 64\] in the source",
    ),
    "changed bytes": (
        lambda export: _rewrite(
            export, "model.layers.3.mlp.experts.2.down_proj.weight", torch.zeros(64, 32).bfloat16()
        ),
        r"model\.layers\.3\.mlp\.experts\.2\.down_proj\.weight differs from the source's bytes",
    ),
    "wrong indexer_types": (
        lambda export: _set_config(export, "indexer_types", ["full"] * NUM_LAYERS),
        r"indexer_types\[1\] is 'full' but index_topk_pattern has 'S' at layer 1",
    ),
    "use_index_cache off": (lambda export: _set_config(export, "use_index_cache", False), "use_index_cache is False"),
    "stale freq": (
        lambda export: _set_config(export, "index_topk_freq", 2),
        "index_topk_freq=2, index_skip_topk_offset=None: both must be integers",
    ),
    "other key changed": (
        lambda export: _set_config(export, "hidden_size", 65),
        "config.json hidden_size is 65, the source has 64",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_validator_catches_a_tampered_export(case, glm_source, glm_export, tmp_path, capsys):
    tamper, message = TAMPERING[case]
    export = tmp_path / "tampered"
    shutil.copytree(glm_export[0], export)
    validate_export(export, glm_source.directory)  # the copy itself is valid
    tamper(export)
    with pytest.raises(ExportValidationError, match=message):
        validate_export(export, glm_source.directory)
    assert main([str(export), "--source", str(glm_source.directory)]) == 1
    assert "invalid IndexCache export" in capsys.readouterr().err


def test_validator_command_line(glm_source, glm_export, tmp_path):
    command = [sys.executable, "-m", "indexcache.validate_export"]
    ok = subprocess.run([*command, str(glm_export[0]), "--source", str(glm_source.directory)], capture_output=True)
    assert ok.returncode == 0, ok.stderr.decode()
    broken = tmp_path / "broken"
    shutil.copytree(glm_export[0], broken)
    (broken / "indexcache.json").unlink()
    failed = subprocess.run([*command, str(broken)], capture_output=True, text=True)
    assert failed.returncode != 0
    assert "no indexcache.json" in failed.stderr


# ---- trained base (issue 9): the export carries every tensor the run trained, in the source's layout ----------------


@pytest.fixture(scope="module")
def trained_base_model(glm_source):
    """The source loaded for training, with every base and F-indexer parameter moved as a training run would."""
    from indexcache.model import IndexCacheModel, get_family

    model = IndexCacheModel(get_family("glm_moe_dsa").load(glm_source.directory, torch.float32), pattern=PATTERN)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, param in model.trainable_parameters(("indexers", "base")):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def test_trained_base_export_keeps_the_source_layout_and_loads_as_the_trained_model(
    glm_source, trained_base_model, tmp_path
):
    from indexcache.export_gather import collect_trained_tensors

    model = trained_base_model
    groups = ("indexers", "base")
    target = export_checkpoint(
        glm_source.directory,
        tmp_path / "export",
        PATTERN,
        "glm_moe_dsa",
        collect_trained_tensors(model, groups),
        SUMMARY,
        trained_groups=groups,
    )
    # Same shard files, each holding the same names as the source's (less the S layers' indexers), same dtypes.
    source_index = json.loads((glm_source.directory / "model.safetensors.index.json").read_text())["weight_map"]
    export_index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    s_indexers = {_indexer(layer, part) for layer in PATTERN.shared_layers for part in INDEXER_PARTS}
    assert export_index == {name: shard for name, shard in source_index.items() if name not in s_indexers}
    exported = read_export(target)
    for name, value in exported.items():
        assert value.dtype == glm_source.stored[name].dtype, name
    # Tensors the model does not train stay byte for byte: the MTP layer and the router's correction bias (a buffer).
    buffers = [name for name in glm_source.stored if name.endswith("e_score_correction_bias")]
    untouched = sorted({*glm_source.mtp_names, *buffers})
    for name in untouched:
        assert as_bytes(exported[name]) == as_bytes(glm_source.stored[name]), name
    # Per-expert tensors carry the trained fused parameters' slices.
    fused = dict(model.hf_model.named_parameters())["model.layers.2.mlp.experts.down_proj"].detach()
    expert = exported["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert torch.equal(expert, fused[3].to(torch.bfloat16))
    assert not torch.equal(expert, glm_source.stored["model.layers.2.mlp.experts.3.down_proj.weight"])

    record = json.loads((target / "indexcache.json").read_text())
    assert record["trained_groups"] == ["indexers", "base"]
    num_indexers = len(PATTERN.full_layers) * len(INDEXER_PARTS)
    base_names = set(exported) - set(untouched) - {n for n in exported if ".self_attn.indexer." in n}
    assert record["tensors"]["trained"] == {"indexers": num_indexers, "base": len(base_names)}
    report = validate_export(target, glm_source.directory)
    assert report.trained == {"indexers": num_indexers, "base": len(base_names)}

    # Stock transformers loads the trained model: every parameter is the trained one, rounded to the stored BF16.
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    trained_state = model.hf_model.state_dict()
    for name, value in loaded.state_dict().items():
        expected = trained_state[name]
        if not name.endswith("e_score_correction_bias") and "rotary_emb" not in name:
            expected = expected.to(torch.bfloat16).float()
        torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=name)


def test_trained_base_tensors_are_checked_against_the_record_not_the_source(glm_source, trained_base_model, tmp_path):
    from indexcache.export_gather import collect_trained_tensors

    groups = ("indexers", "base")
    target = export_checkpoint(
        glm_source.directory,
        tmp_path / "export",
        PATTERN,
        "glm_moe_dsa",
        collect_trained_tensors(trained_base_model, groups),
        SUMMARY,
        trained_groups=groups,
    )
    validate_export(target, glm_source.directory)  # trained base tensors differ from the source, and that is valid
    # Put the *source's* value back into a trained tensor: it now matches the source but not what the run trained.
    name = "model.embed_tokens.weight"
    _rewrite(target, name, glm_source.stored[name])
    with pytest.raises(ExportValidationError, match=rf"{re.escape(name)} has changed since export"):
        validate_export(target, glm_source.directory)


def test_base_tensors_need_the_base_group_and_mtp_tensors_are_refused(glm_source, tmp_path):
    trained = trained_indexers(glm_source, PATTERN)
    base = {"model.norm.weight": torch.ones(TINY_DSA["hidden_size"])}
    with pytest.raises(ExportError, match=r"model\.norm\.weight is in group 'base'.*add 'base' to trained_groups"):
        export_checkpoint(glm_source.directory, tmp_path / "a", PATTERN, "glm_moe_dsa", {**trained, **base}, SUMMARY)
    mtp = {glm_source.mtp_names[0]: glm_source.stored[glm_source.mtp_names[0]].float()}
    with pytest.raises(ExportError, match="belongs to the MTP layer"):
        export_checkpoint(
            glm_source.directory,
            tmp_path / "b",
            PATTERN,
            "glm_moe_dsa",
            {**trained, **mtp},
            SUMMARY,
            trained_groups=("indexers", "base"),
        )
    assert leftovers(tmp_path) == []


# ---- integrity without the source (issue 14) -------------------------------------------------------------------------


def _flip_byte(export: Path, name: str) -> None:
    """Flip one bit of tensor `name` in place, in a shard that is this export's own file (not a link)."""
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shard = export / index["weight_map"][name]
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]
    data[8 + header_len + start + 3] ^= 0x10
    shard.unlink()  # never write through a hard link into the source
    shard.write_bytes(bytes(data))


SOURCELESS_DAMAGE = {
    "flipped byte in the embedding": (
        lambda export: _flip_byte(export, "model.embed_tokens.weight"),
        r"model\.embed_tokens\.weight has changed since export",
    ),
    "expert removed from its shard and the index": (
        lambda export: _rewrite(export, "model.layers.3.mlp.experts.2.down_proj.weight", None),
        r"model\.layers\.3\.mlp\.experts\.2\.down_proj\.weight is recorded in indexcache\.tensors\.json but missing",
    ),
}


@pytest.mark.parametrize("case", list(SOURCELESS_DAMAGE))
def test_validator_without_source_catches_damage(case, glm_export, tmp_path, capsys):
    damage, message = SOURCELESS_DAMAGE[case]
    export = tmp_path / "damaged"
    shutil.copytree(glm_export[0], export)
    assert main([str(export), "--no-source"]) == 0
    damage(export)
    with pytest.raises(ExportValidationError, match=message):
        validate_export(export)
    capsys.readouterr()
    assert main([str(export), "--no-source"]) == 1
    assert re.search(message, capsys.readouterr().err)


def test_validator_command_uses_the_recorded_source_when_it_is_there(glm_source, tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(glm_source.directory, copy)
    export = export_checkpoint(
        copy, tmp_path / "export", PATTERN, "glm_moe_dsa", trained_indexers(glm_source, PATTERN), SUMMARY
    )
    command = [sys.executable, "-m", "indexcache.validate_export", str(export)]
    with_source = subprocess.run(command, capture_output=True, text=True)
    assert with_source.returncode == 0, with_source.stderr
    assert f"checked against source {copy.resolve()}" in with_source.stdout
    # A byte changed in the source (an untouched tensor): only a comparison with the source can see it.
    _flip_byte(copy, "model.norm.weight")
    assert subprocess.run(command, capture_output=True, text=True).returncode == 1
    shutil.rmtree(copy)
    without = subprocess.run(command, capture_output=True, text=True)
    assert without.returncode == 0, without.stderr
    assert "checked against the recorded checksums only" in without.stdout


def test_checksum_file_edited_to_match_damage_is_caught(glm_export, tmp_path):
    export = tmp_path / "edited"
    shutil.copytree(glm_export[0], export)
    _flip_byte(export, "model.norm.weight")
    checksums = json.loads((export / "indexcache.tensors.json").read_text())
    checksums["tensors"]["model.norm.weight"]["sha256"] = "0" * 64
    (export / "indexcache.tensors.json").write_text(json.dumps(checksums))
    with pytest.raises(ExportValidationError, match=r"does not match the sha256 indexcache\.json records"):
        validate_export(export)


# ---- temporary directories a killed export left (issue 14) -----------------------------------------------------------

_KILLED_EXPORT = """
import sys, time
from pathlib import Path
import torch
import indexcache.export as export_module

def stall(staging, source):  # the export is complete in staging: stop here until killed
    Path(sys.argv[3]).write_text(str(staging))
    time.sleep(600)

export_module.validate_export = stall
trained = torch.load(sys.argv[4])
export_module.export_checkpoint(sys.argv[1], sys.argv[2], "FSFFS", "glm_moe_dsa", trained, {})
"""


def test_next_export_removes_what_a_killed_export_left(glm_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target, ready = out / "export", tmp_path / "ready"
    torch.save(trained_indexers(glm_source, PATTERN), tmp_path / "trained.pt")
    script = [sys.executable, "-c", _KILLED_EXPORT, str(glm_source.directory), str(target), str(ready)]
    proc = subprocess.Popen([*script, str(tmp_path / "trained.pt")])
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    staging = Path(ready.read_text())
    assert staging.parent == out and staging.name.startswith(".export.tmp-")
    assert len(list(staging.glob("*.safetensors"))) == 3  # the kill left a full copy of the weights
    # Things that only look like ours are left alone: other targets, other suffixes, files, links.
    decoys = [".export.tmp-notours", ".other.tmp-0123456789ab", ".export.tmp-0123456789abc"]
    for name in decoys:
        (out / name).mkdir()
    (out / ".export.tmp-aaaaaaaaaaaa").write_text("a file, not a staging directory")
    (out / ".export.tmp-bbbbbbbbbbbb").symlink_to(glm_source.directory)
    decoys += [".export.tmp-aaaaaaaaaaaa", ".export.tmp-bbbbbbbbbbbb"]

    export_checkpoint(glm_source.directory, target, PATTERN, "glm_moe_dsa", trained_indexers(glm_source, PATTERN), {})
    assert leftovers(out) == sorted(["export", *decoys])
    assert (glm_source.directory / "config.json").is_file()  # the symlinked decoy was not followed


def test_a_replaced_exports_old_copy_is_removed_only_once_the_new_one_is_in_place(glm_source, tmp_path):
    trained = trained_indexers(glm_source, PATTERN)
    old = tmp_path / ".export.old-0123456789ab"  # what a kill between the two renames of an overwrite leaves
    old.mkdir()
    export = export_checkpoint(glm_source.directory, tmp_path / "export", PATTERN, "glm_moe_dsa", trained, {})
    assert old.is_dir()  # there was no "export" when this one started: the old copy may have been the only one
    export_checkpoint(glm_source.directory, export, PATTERN, "glm_moe_dsa", trained, {}, overwrite=True)
    assert leftovers(tmp_path) == ["export"]


def test_a_quantised_base_is_refused_before_anything_is_gathered(glm_source, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(glm_source.directory, source)
    _rewrite(source, "model.norm.weight", glm_source.stored["model.norm.weight"].to(torch.float8_e4m3fn))
    consumed = []

    def stream():  # a trained-tensor stream that records how far the export read it
        for name, value in trained_indexers(glm_source, PATTERN).items():
            consumed.append(name)
            yield name, value

    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"model\.norm\.weight is stored as F8_E4M3.*BF16/FP32 checkpoint") as info:
        export_checkpoint(
            source, out / "export", PATTERN, "glm_moe_dsa", stream(), {}, trained_groups=("indexers", "base")
        )
    assert "\n" not in str(info.value)
    assert not out.exists() or leftovers(out) == []
    # The stream was still run to its end, so ranks gathering in step with this one are not left waiting.
    assert len(consumed) == len(PATTERN.full_layers) * len(INDEXER_PARTS)
