"""Dense-to-DSA conversion on tiny models: llama (our DSA llama) and glm4_moe_lite -> stock glm_moe_dsa.

What must hold: the converted folder reloads with no missing/unexpected tensor, base tensors are byte-identical,
only indexer tensors are new, and with index_topk >= T the DSA model *is* the dense source (same logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    GlmMoeDsaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from indexcache.conversion.convert import write_dsa_folder
from indexcache.conversion.dispatch import convert_dense_to_dsa
from indexcache.conversion.glm4_moe_lite import convert_glm4_moe_lite_to_dsa, interleave_permutation
from indexcache.conversion.llama import convert_llama_to_dsa
from indexcache.export import export_checkpoint
from indexcache.model.dsa_config import DsaIndexConfig
from indexcache.model.llama_dsa import (
    LlamaDsaAttention,
    LlamaDsaForCausalLM,
    SharedTopk,
    load_llama_dsa,
    tiny_llama_dsa_config,
)
from indexcache.model.registry import get_family
from indexcache.model.tiny import TINY_DSA_DIMS
from indexcache.model.wrapper import IndexCacheModel
from indexcache.pattern import IndexCachePattern
from tests.conftest import LowestIndexTopk

SEQ = 24
INDEXER_PARAMS = {"wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"}
DENSE_INDEX = DsaIndexConfig(index_topk=64, index_n_heads=4, index_head_dim=32, index_rope_head_dim=8)  # 64 >= SEQ
SPARSE_TOPK = 6


def tiny_dense_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        initializer_range=0.1,
        tie_word_embeddings=True,  # like SmolLM2: lm_head is not stored
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_glm4_moe_lite(rope_interleave: bool, seed: int = 0) -> Glm4MoeLiteForCausalLM:
    dims = {k: v for k, v in TINY_DSA_DIMS.items() if not k.startswith("index_") and k != "first_k_dense_replace"}
    torch.manual_seed(seed)
    config = Glm4MoeLiteConfig(**dims, rope_interleave=rope_interleave)
    return Glm4MoeLiteForCausalLM(config).eval()


def token_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of SEQ tokens, the second right-padded after 17 tokens."""
    input_ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, 17:] = 0
    return input_ids, attention_mask


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[name] = handle.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


def source_tensors(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def with_topk(model: torch.nn.Module, topk: int) -> torch.nn.Module:
    for layer in model.model.layers:
        indexer = layer.self_attn.indexer
        if indexer is not None and not isinstance(indexer, SharedTopk):
            indexer.index_topk = topk
    return model


# ---- llama ----------------------------------------------------------------------------------------------------------
def test_llama_conversion_adds_only_indexer_tensors(tmp_path: Path):
    dense = tiny_dense_llama()
    source = source_tensors(dense, tmp_path / "src")
    out = convert_llama_to_dsa(tmp_path / "src", tmp_path / "dsa", DENSE_INDEX)

    stored = stored_tensors(out)
    new = set(stored) - set(source)
    assert set(source) <= set(stored)
    assert new == {f"model.layers.{i}.self_attn.indexer.{p}" for i in range(4) for p in INDEXER_PARAMS}
    for name, tensor in source.items():
        assert torch.equal(stored[name], tensor), name

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["index_topk"], config["index_n_heads"], config["index_head_dim"]) == (64, 4, 32)
    assert config["index_rope_head_dim"] == 8
    assert config["indexer_types"] == ["full"] * 4

    model = load_llama_dsa(out)  # raises on any missing tensor
    dense_names = {name for name, _ in dense.named_parameters()}
    dsa_names = {name for name, _ in model.named_parameters()}
    assert dense_names <= dsa_names
    assert {name.split(".indexer.")[1] for name in dsa_names - dense_names} == INDEXER_PARAMS
    assert len(dsa_names - dense_names) == 4 * len(INDEXER_PARAMS)
    for name, param in dense.named_parameters():
        assert torch.equal(model.get_parameter(name), param), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_llama_dsa_with_full_topk_is_the_dense_model(tmp_path: Path, attn_implementation: str):
    dense = tiny_dense_llama()
    out = convert_llama_to_dsa(dense, tmp_path / "dsa", DENSE_INDEX)
    model = load_llama_dsa(out, attn_implementation=attn_implementation)
    dense.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = token_batch()
    with torch.no_grad():
        expected = dense(input_ids, attention_mask=attention_mask).logits
        got = model(input_ids, attention_mask=attention_mask).logits
        sparse = with_topk(model, SPARSE_TOPK)(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert torch.equal(got[real], expected[real])
    # Control: the indexer really restricts attention once index_topk < T.
    assert (sparse[real] - expected[real]).abs().max() > 1e-3


def test_llama_stock_sparse_attention_matches_indexcache_backend():
    model = tiny_llama_and_family_build(topk=SPARSE_TOPK)
    input_ids, attention_mask = token_batch()
    with torch.no_grad(), LowestIndexTopk():  # stock's top-k under the project's tie rule (see conftest)
        stock = model(input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        wrapped = IndexCacheModel(model, mode="sparse")(input_ids, attention_mask, return_logits=True).logits
    real = attention_mask.bool()
    torch.testing.assert_close(wrapped[real], stock[real], rtol=1e-5, atol=1e-5)


def tiny_llama_and_family_build(topk: int, seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = get_family("llama").build(tiny_llama_dsa_config(index_topk=topk, **overrides))
    model.set_attn_implementation("eager")
    return model.eval()


def test_llama_checkpoint_with_shared_layers_reuses_the_f_layers_topk():
    """A folder whose config says FSFS (as an IndexCache export would): S layers carry no indexer and attend with
    their F layer's top-k, exactly as IndexCacheModel does with that pattern."""
    all_full = tiny_llama_and_family_build(topk=SPARSE_TOPK)
    shared = tiny_llama_and_family_build(topk=SPARSE_TOPK, indexer_types=["full", "shared", "full", "shared"])
    missing, unexpected = shared.load_state_dict(all_full.state_dict(), strict=False)
    assert not missing
    assert {key.split(".self_attn.")[0] for key in unexpected} == {"model.layers.1", "model.layers.3"}
    assert isinstance(shared.model.layers[1].self_attn.indexer, SharedTopk)

    input_ids, attention_mask = token_batch()
    with torch.no_grad(), LowestIndexTopk():
        stock = shared(input_ids, attention_mask=attention_mask).logits
        wrapped = IndexCacheModel(all_full, IndexCachePattern("FSFS"), mode="sparse")
        expected = wrapped(input_ids, attention_mask=attention_mask, return_logits=True).logits
    real = attention_mask.bool()
    torch.testing.assert_close(stock[real], expected[real], rtol=1e-5, atol=1e-5)
    assert shared._topk_relay == {}  # nothing outlives the forward


def test_llama_indexcache_export_reloads_with_its_pattern(tmp_path: Path):
    """convert -> IndexCacheModel (FSFS, indexers changed as training would) -> export -> load_llama_dsa: the
    reloaded stock model attends exactly like the wrapper did."""
    source = convert_llama_to_dsa(tiny_dense_llama(), tmp_path / "dsa", DsaIndexConfig(SPARSE_TOPK, 4, 32, 8))
    wrapped = IndexCacheModel(load_llama_dsa(source), IndexCachePattern("FSFS"), mode="sparse")
    with torch.no_grad():
        for _, param in wrapped.indexer_parameters():
            param.add_(0.05 * torch.randn_like(param))
    input_ids, attention_mask = token_batch()
    with torch.no_grad():
        expected = wrapped(input_ids, attention_mask=attention_mask, return_logits=True).logits
    exported = export_checkpoint(source, tmp_path / "export", "FSFS", "llama", wrapped.indexer_state_dict(), {})

    reloaded = load_llama_dsa(exported)
    assert reloaded.config.indexer_types == ["full", "shared", "full", "shared"]
    assert {name.split(".self_attn.")[0] for name, _ in reloaded.named_parameters() if ".indexer." in name} == {
        "model.layers.0",
        "model.layers.2",
    }
    with torch.no_grad(), LowestIndexTopk():
        got = reloaded(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_llama_kv_cache_decoding_matches_full_forward():
    """The indexer key cache (layer_types "indexed_attention") makes incremental decoding see every past key.

    16 indexer heads: with 4, some keys score exactly 0 (every head's ReLU is off) and top-k breaks such ties
    differently in a [T, S] and a [1, S] call, which is the stock indexers' behaviour too, not a cache bug.
    """
    model = tiny_llama_and_family_build(topk=SPARSE_TOPK, index_n_heads=16)
    input_ids, _ = token_batch()
    with torch.no_grad():
        full = model(input_ids).logits
        prefix = 10
        out = model(input_ids[:, :prefix], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for pos in range(prefix, SEQ - 1):
            out = model(input_ids[:, pos : pos + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, prefix - 1 : SEQ - 1], rtol=1e-5, atol=1e-5)


def test_llama_indexer_rope_is_narrow_rope_with_the_same_theta():
    """Sub-sampling the attention's rotary table gives exactly RoPE of the indexer's width (documented choice)."""
    config = tiny_llama_dsa_config(rope_theta=500.0)
    attention = LlamaDsaAttention(config, layer_idx=0)
    position_ids = torch.arange(SEQ)[None]
    x = torch.zeros(1, SEQ, 1)
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
    narrow = LlamaConfig(**{**config.to_dict(), "head_dim": config.index_rope_head_dim})
    expected_cos, expected_sin = LlamaRotaryEmbedding(narrow)(x, position_ids)
    got_cos, got_sin = attention.indexer_position_embeddings(cos, sin)
    assert got_cos.shape[-1] == config.index_rope_head_dim
    torch.testing.assert_close(got_cos, expected_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_sin, expected_sin, rtol=1e-6, atol=1e-6)


def test_llama_family_trains_only_indexers():
    model = tiny_llama_and_family_build(topk=SPARSE_TOPK)
    wrapped = IndexCacheModel(model, mode="dense")
    input_ids, attention_mask = token_batch()
    wrapped(input_ids, attention_mask=attention_mask).loss.backward()
    indexer_names = {name for name, _ in wrapped.indexer_parameters()}
    assert len(indexer_names) == 4 * len(INDEXER_PARAMS)
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and param.grad.abs().sum() > 0
        assert has_grad == (name in indexer_names), name


def test_llama_conversion_keeps_dtype_and_refuses_bad_requests(tmp_path: Path):
    out = convert_llama_to_dsa(tiny_dense_llama(dtype=torch.bfloat16), tmp_path / "dsa", DENSE_INDEX)
    assert {tensor.dtype for tensor in stored_tensors(out).values()} == {torch.bfloat16}
    with pytest.raises(FileExistsError):
        convert_llama_to_dsa(tiny_dense_llama(), out, DENSE_INDEX)
    with pytest.raises(ValueError, match="already a DSA llama"):
        convert_llama_to_dsa(out, tmp_path / "again", DENSE_INDEX)
    with pytest.raises(ValueError, match="index_rope_head_dim=12"):
        # 12 roped dims would need every (8/6)-th of the attention's 8 frequencies.
        convert_llama_to_dsa(tiny_dense_llama(), tmp_path / "bad", DsaIndexConfig(8, 4, 32, index_rope_head_dim=12))
    with pytest.raises(ValueError, match="no DSA indexer keys"):
        load_llama_dsa(_saved(tiny_dense_llama(), tmp_path / "plain"))


def _saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path):
    source = _saved(tiny_dense_llama(), tmp_path / "src")
    config = LlamaDsaForCausalLM.config_class.from_pretrained(source)

    def explode(name: str):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dsa_folder(source, tmp_path / "out" / "dsa", config, {}, {}, rewrite=explode)
    assert list((tmp_path / "out").iterdir()) == []


# ---- glm4_moe_lite -> glm_moe_dsa -----------------------------------------------------------------------------------
def test_interleaved_rope_on_permuted_rows_is_half_split_rope():
    rope_dim = 16
    q, k = torch.randn(2, 3, 5, rope_dim), torch.randn(2, 3, 5, rope_dim)
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(head_dim=rope_dim))(q, torch.arange(5)[None])
    perm = interleave_permutation(rope_dim)
    half_q, half_k = apply_rotary_pos_emb(q, k, cos, sin)
    inter_q, inter_k = apply_rotary_pos_emb_interleave(q[..., perm], k[..., perm], cos, sin)
    assert torch.equal(inter_q, half_q) and torch.equal(inter_k, half_k)


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_glm4_moe_lite_converts_to_stock_glm_moe_dsa(tmp_path: Path, rope_interleave: bool):
    source_model = tiny_glm4_moe_lite(rope_interleave)
    source = source_tensors(source_model, tmp_path / "src")
    out = convert_glm4_moe_lite_to_dsa(tmp_path / "src", tmp_path / "dsa", DsaIndexConfig(64, 4, 32))

    model, info = GlmMoeDsaForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(AutoModelForCausalLM.from_pretrained(out)) is GlmMoeDsaForCausalLM
    assert model.config.model_type == "glm_moe_dsa"
    assert model.config.indexer_types == ["full"] * 4
    assert model.config.mlp_layer_types == source_model.config.mlp_layer_types

    stored = stored_tensors(out)
    assert {name.split(".indexer.")[1] for name in set(stored) - set(source)} == INDEXER_PARAMS
    permuted = {name for name in source if not torch.equal(stored[name], source[name])}
    if rope_interleave:
        assert permuted == set()
    else:
        assert permuted == {
            f"model.layers.{i}.self_attn.{p}.weight" for i in range(4) for p in ("q_b_proj", "kv_a_proj_with_mqa")
        }

    source_model.set_attn_implementation("eager")
    input_ids, attention_mask = token_batch()
    with torch.no_grad():
        expected = source_model(input_ids, attention_mask=attention_mask).logits
        got = model(input_ids, attention_mask=attention_mask).logits
        sparse = with_topk(model, SPARSE_TOPK)(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert (sparse[real] - expected[real]).abs().max() > 1e-3  # control: index_topk < T does restrict attention


def test_glm4_moe_lite_mtp_layer_is_copied_and_permuted_without_an_indexer(tmp_path: Path):
    """GLM-4.7-Flash stores an MTP layer as model.layers.{num_hidden_layers}.*: kept, RoPE rows converted too."""
    source = tiny_glm4_moe_lite(rope_interleave=False)
    tensors = source_tensors(source, tmp_path / "src")
    mtp = {
        "model.layers.4.self_attn.q_b_proj.weight": torch.randn_like(
            tensors["model.layers.0.self_attn.q_b_proj.weight"]
        ),
        "model.layers.4.eh_proj.weight": torch.randn(64, 128),
    }
    save_file({**tensors, **mtp}, tmp_path / "src" / "model.safetensors", {"format": "pt"})
    out = convert_glm4_moe_lite_to_dsa(tmp_path / "src", tmp_path / "dsa", DsaIndexConfig(8, 4, 32))

    stored = stored_tensors(out)
    assert torch.equal(stored["model.layers.4.eh_proj.weight"], mtp["model.layers.4.eh_proj.weight"])
    # The MTP attention gets exactly the permutation layer 0 got.
    layer0_perm = _row_order(
        tensors["model.layers.0.self_attn.q_b_proj.weight"], stored["model.layers.0.self_attn.q_b_proj.weight"]
    )
    mtp_perm = _row_order(
        mtp["model.layers.4.self_attn.q_b_proj.weight"], stored["model.layers.4.self_attn.q_b_proj.weight"]
    )
    assert mtp_perm == layer0_perm != list(range(len(layer0_perm)))
    assert not any(name.startswith("model.layers.4.self_attn.indexer") for name in stored)


def _row_order(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which row of `before` each row of `after` is (rows are distinct random vectors)."""
    return [int((before == row).all(dim=1).nonzero()[0]) for row in after]


def test_glm_rope_layout_matters_for_a_half_split_source():
    """Control for the permutation: the same weights run with the other RoPE layout give other logits."""
    half_split = tiny_glm4_moe_lite(rope_interleave=False)
    interleaved = tiny_glm4_moe_lite(rope_interleave=True)
    interleaved.load_state_dict(half_split.state_dict())
    input_ids, _ = token_batch()
    with torch.no_grad():
        assert (half_split(input_ids).logits - interleaved(input_ids).logits).abs().max() > 1e-3


def test_glm4_moe_lite_conversion_keeps_dtype_and_refuses_what_it_cannot_convert(tmp_path: Path):
    out = convert_glm4_moe_lite_to_dsa(
        tiny_glm4_moe_lite(True).to(torch.bfloat16), tmp_path / "bf16", DsaIndexConfig(8, 4, 32)
    )
    assert {tensor.dtype for tensor in stored_tensors(out).values() if tensor.is_floating_point()} == {torch.bfloat16}
    no_latent = Glm4MoeLiteForCausalLM(
        Glm4MoeLiteConfig(**{**tiny_glm4_moe_lite(True).config.to_dict(), "q_lora_rank": None})
    )
    with pytest.raises(ValueError, match="q_lora_rank is None"):
        convert_glm4_moe_lite_to_dsa(no_latent, tmp_path / "no_latent", DsaIndexConfig(8, 4, 32))
    with pytest.raises(ValueError, match="index_rope_head_dim=8"):
        convert_glm4_moe_lite_to_dsa(tiny_glm4_moe_lite(True), tmp_path / "rope", DsaIndexConfig(8, 4, 32, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


# ---- dispatch on the source model_type ------------------------------------------------------------------------------
def test_convert_dense_to_dsa_dispatches_on_the_source_model_type(tmp_path: Path):
    llama = _saved(tiny_dense_llama(), tmp_path / "llama")
    glm = _saved(tiny_glm4_moe_lite(rope_interleave=False), tmp_path / "glm")
    glm_index = DsaIndexConfig(64, 4, 32)
    pairs = [
        (
            convert_dense_to_dsa(llama, tmp_path / "a", DENSE_INDEX),
            convert_llama_to_dsa(llama, tmp_path / "b", DENSE_INDEX),
        ),
        (
            convert_dense_to_dsa(glm, tmp_path / "c", glm_index),
            convert_glm4_moe_lite_to_dsa(glm, tmp_path / "d", glm_index),
        ),
    ]
    for dispatched, direct in pairs:  # the same folder as the family's own converter writes
        assert json.loads((dispatched / "config.json").read_text()) == json.loads((direct / "config.json").read_text())
        expected = stored_tensors(direct)
        got = stored_tensors(dispatched)
        assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)

    (tmp_path / "dsa").mkdir()
    (tmp_path / "dsa" / "config.json").write_text(json.dumps({"model_type": "glm_moe_dsa"}))
    with pytest.raises(
        ValueError, match=r"model_type='glm_moe_dsa': dense-to-DSA conversion supports glm4_moe_lite, llama$"
    ):
        convert_dense_to_dsa(tmp_path / "dsa", tmp_path / "never", DENSE_INDEX)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        convert_dense_to_dsa(tmp_path / "missing", tmp_path / "never", DENSE_INDEX)
    assert not (tmp_path / "never").exists()
