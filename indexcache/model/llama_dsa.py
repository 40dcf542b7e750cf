"""Llama with DeepSeek Sparse Attention: the `llama` family, for dense-to-DSA conversion (SmolLM2-135M).

A lightning indexer is attached to every layer's attention, under the GLM-5 checkpoint names
`model.layers.{i}.self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`. The indexer *is* transformers'
`DeepseekV32Indexer` (so the core's `TrainableDeepseekV32Indexer` trains it unchanged), built from a small derived
config (`LlamaIndexerConfig`) because Llama differs from DeepSeek-V3.2 in two places:

- no Q-LoRA latent: `wq_b` reads the layer's normed hidden state (the attention input, after input_layernorm), i.e.
  `q_lora_rank = hidden_size`; `wk` and `weights_proj` read it too, as in DeepSeek-V3.2 and GLM-5;
- RoPE: the indexer rotates its first `index_rope_head_dim` dims with the half-split (`rotate_half`) layout that
  Llama's attention and DeepSeek-V3.2's indexer use (GLM-5's indexer interleaves; nothing here is tied to a serving
  kernel, so we keep the layout of the model being converted). Its frequencies are every
  `head_dim / index_rope_head_dim`-th frequency of the model's own rotary embedding, which for default RoPE is
  exactly RoPE of width `index_rope_head_dim` with the same theta (and any rope scaling carries over).

Default indexer shape for SmolLM2 (`SMOLLM2_INDEX`: 4 heads x 64, 32 roped dims, top-256): the GLM-5 / DeepSeek-V3.2
proportions scaled down: about half as many indexer heads as attention heads (9), an indexer width equal to the
attention head width (64), half of it roped (GLM-5: 64 of 128). top-256 is 1/32 of SmolLM2's 8K context; set
`index_topk` below the training sequence length or sparse training is dense.

Converted folders keep `model_type: llama`: `config.json` gains `index_topk`, `index_n_heads`, `index_head_dim`,
`index_rope_head_dim`, `indexer_types` (all "full" after conversion) and `layer_types` ("indexed_attention", which
makes transformers' cache keep the indexer keys during generation). Base tensors are copied byte for byte; the
indexer tensors sit in their own shard. Stock `LlamaForCausalLM` still loads the folder (it ignores the indexer);
`load_llama_dsa` rebuilds the DSA model.

The conversion helpers `DsaIndexConfig`, `init_indexer_tensors` and `write_dsa_folder` are shared with
`glm4_moe_lite.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, eager_attention_forward

from indexcache.model.indexer import TrainableDeepseekV32Indexer, to_trainable
from indexcache.model.registry import ModelFamily, SharedIndexerFactory, register_family
from indexcache.pattern import IndexCachePattern

__all__ = [
    "SMOLLM2_INDEX",
    "DsaIndexConfig",
    "LlamaDsaAttention",
    "LlamaDsaForCausalLM",
    "LlamaIndexerConfig",
    "base_dtype",
    "convert_llama_to_dsa",
    "init_indexer_tensors",
    "llama_dsa_config",
    "load_llama_dsa",
    "make_shareable",
    "tiny_llama_dsa_config",
    "write_dsa_folder",
]

INDEX_KEYS = ("index_topk", "index_n_heads", "index_head_dim", "index_rope_head_dim")
INDEXER_SHARD = "model-indexer.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONVERSION_RECORD = "indexcache_conversion.json"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ---- conversion helpers shared by the dense-to-DSA families ---------------------------------------------------------
@dataclass(frozen=True)
class DsaIndexConfig:
    """Shape and initialisation of the lightning indexers a dense-to-DSA conversion adds.

    index_rope_head_dim: roped indexer dims. None = the family's default (llama: index_head_dim // 2; glm4_moe_lite:
        the model's qk_rope_head_dim, the only value transformers' glm_moe_dsa supports).
    init_std: std of the normal init of wq_b / wk / weights_proj (k_norm starts at the identity). None = the
        source config's initializer_range, what transformers would use.
    seed: the indexers' init is a function of (seed, shapes) only, so a conversion is reproducible.
    """

    index_topk: int
    index_n_heads: int
    index_head_dim: int
    index_rope_head_dim: int | None = None
    init_std: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("index_topk", "index_n_heads", "index_head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: use a positive integer")
        rope = self.index_rope_head_dim
        if rope is not None and (rope < 2 or rope % 2 or rope > self.index_head_dim):
            raise ValueError(
                f"index_rope_head_dim={rope} is invalid: use an even number in [2, {self.index_head_dim}] "
                "(the indexer's width)"
            )
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} is invalid: use a positive std (or None)")


SMOLLM2_INDEX = DsaIndexConfig(index_topk=256, index_n_heads=4, index_head_dim=64, index_rope_head_dim=32)


def init_indexer_tensors(
    num_layers: int,
    hidden_size: int,
    q_input_size: int,
    index_cfg: DsaIndexConfig,
    std: float,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Freshly initialised indexer tensors of every layer, under their checkpoint names.

    Linear weights ~ N(0, std) (transformers' own Linear init), k_norm = identity LayerNorm. Drawn in float32 from
    one seeded generator in a fixed order, then cast, so the same (seed, shapes) give the same tensors in any dtype.
    """
    generator = torch.Generator().manual_seed(index_cfg.seed)
    heads, width = index_cfg.index_n_heads, index_cfg.index_head_dim

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).mul_(std).to(dtype)

    tensors: dict[str, Tensor] = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.self_attn.indexer"
        tensors[f"{prefix}.wq_b.weight"] = normal(heads * width, q_input_size)
        tensors[f"{prefix}.wk.weight"] = normal(width, hidden_size)
        tensors[f"{prefix}.k_norm.weight"] = torch.ones(width, dtype=dtype)
        tensors[f"{prefix}.k_norm.bias"] = torch.zeros(width, dtype=dtype)
        tensors[f"{prefix}.weights_proj.weight"] = normal(heads, hidden_size)
    return tensors


# (tensor name) -> a function rewriting that tensor, or None to copy it unchanged.
TensorRewrite = Callable[[str], Callable[[Tensor], Tensor] | None]


def write_dsa_folder(
    source_dir: Path,
    out_dir: Path,
    config: PretrainedConfig,
    indexer_tensors: Mapping[str, Tensor],
    record: dict,
    rewrite: TensorRewrite | None = None,
) -> Path:
    """Write a converted checkpoint atomically: source shards + an indexer shard + `config` + index + `record`.

    Shards in which `rewrite` changes nothing are copied byte for byte (streamed: a 60 GB checkpoint needs no RAM);
    the others are rewritten one at a time. Every other top-level file of the source (tokenizer, generation config,
    chat template) is copied. A source saved as one `model.safetensors` is copied as `model-base.safetensors`, since
    transformers would read a lone `model.safetensors` and never see the index that lists the indexer shard.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: choose a new output folder (conversions never overwrite)")
    shards = _source_shards(source_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the target, so the final rename is atomic: readers never see a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for shard in shards:
            target_name = "model-base.safetensors" if shard.name == "model.safetensors" else shard.name
            sizes = _tensor_nbytes(shard)
            overlap = sorted(set(sizes) & set(indexer_tensors))
            if overlap:
                raise ValueError(f"{source_dir} already holds indexer tensors (e.g. {overlap[0]}): it is not dense")
            _copy_shard(shard, staging / target_name, rewrite)
            weight_map.update(dict.fromkeys(sizes, target_name))
            total_size += sum(sizes.values())
        save_file(
            {name: t.contiguous() for name, t in indexer_tensors.items()}, staging / INDEXER_SHARD, {"format": "pt"}
        )
        weight_map.update(dict.fromkeys(indexer_tensors, INDEXER_SHARD))
        total_size += sum(t.numel() * t.element_size() for t in indexer_tensors.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        skip = {"config.json", WEIGHTS_INDEX, *(s.name for s in shards)}
        for path in source_dir.iterdir():
            if path.is_file() and path.name not in skip and not path.name.endswith((".bin", ".pt", ".pth")):
                shutil.copy2(path, staging / path.name)
        config.save_pretrained(staging)
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        make_shareable(staging)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def make_shareable(folder: Path) -> None:
    """Give a finished folder the permissions the umask allows.

    mkdtemp creates 0700 folders and safetensors writes 0600 files; a shared cache must be readable by others.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _source_shards(source_dir: Path) -> list[Path]:
    index_path = source_dir / WEIGHTS_INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [source_dir / name for name in sorted(set(weight_map.values()))]
    single = source_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{source_dir} has no safetensors weights (model.safetensors or {WEIGHTS_INDEX})")


def _read_header(shard: Path) -> dict[str, dict]:
    # The safetensors header (8-byte little-endian length, then JSON) is all we need: no tensor is read.
    with open(shard, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return header


def _tensor_nbytes(shard: Path) -> dict[str, int]:
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in _read_header(shard).items()}


def _copy_shard(shard: Path, target: Path, rewrite: TensorRewrite | None) -> None:
    rewrites = {name: fn for name in _tensor_nbytes(shard) if rewrite and (fn := rewrite(name)) is not None}
    if not rewrites:
        shutil.copyfile(shard, target)
        return
    with safe_open(shard, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    for name, fn in rewrites.items():
        tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, target, metadata)


# ---- the llama DSA model -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaIndexerConfig:
    """The fields `DeepseekV32Indexer.__init__` reads, derived from a llama DSA config."""

    hidden_size: int
    index_n_heads: int
    index_head_dim: int
    qk_rope_head_dim: int  # the indexer's roped dims (DeepSeek's name for them)
    index_topk: int
    q_lora_rank: int  # = hidden_size: Llama has no query latent, wq_b reads the normed hidden state

    @classmethod
    def from_llama(cls, config: PretrainedConfig) -> LlamaIndexerConfig:
        missing = [key for key in INDEX_KEYS if getattr(config, key, None) is None]
        if missing:
            raise ValueError(
                f"llama config has no DSA indexer keys {missing}: convert the checkpoint first with "
                "indexcache.model.llama_dsa.convert_llama_to_dsa"
            )
        return cls(
            hidden_size=config.hidden_size,
            index_n_heads=config.index_n_heads,
            index_head_dim=config.index_head_dim,
            qk_rope_head_dim=config.index_rope_head_dim,
            index_topk=config.index_topk,
            q_lora_rank=config.hidden_size,
        )


def llama_dsa_config(config: LlamaConfig, index_cfg: DsaIndexConfig) -> LlamaConfig:
    """A copy of a dense llama config with the DSA keys added (every layer "full" and "indexed_attention")."""
    if config.model_type != "llama":
        raise ValueError(f"expected a llama config, got model_type={config.model_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = index_cfg.index_rope_head_dim or index_cfg.index_head_dim // 2
    _check_rope_subsampling(head_dim, rope)
    fields = config.to_dict()
    fields.pop("architectures", None)
    num_layers = config.num_hidden_layers
    fields.update(
        index_topk=index_cfg.index_topk,
        index_n_heads=index_cfg.index_n_heads,
        index_head_dim=index_cfg.index_head_dim,
        index_rope_head_dim=rope,
        indexer_types=["full"] * num_layers,
        # transformers' DynamicCache gives "indexed_attention" layers the indexer key cache DeepseekV32Indexer uses.
        layer_types=["indexed_attention"] * num_layers,
        architectures=[LlamaDsaForCausalLM.__name__],
    )
    return LlamaConfig.from_dict(fields)


def _check_rope_subsampling(head_dim: int, rope_dim: int) -> None:
    if rope_dim < 2 or rope_dim % 2 or (head_dim // 2) % (rope_dim // 2):
        raise ValueError(
            f"index_rope_head_dim={rope_dim} is invalid for head_dim={head_dim}: the indexer reuses every "
            f"k-th rotary frequency of the attention, so use an even number whose half divides {head_dim // 2}"
        )


def _causal_mask(batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """[B, 1, T, S] boolean causal mask; queries are the last q_len positions (KV cache)."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    return (key_pos <= query_pos)[None, None].expand(batch, 1, q_len, kv_len)


class SharedTopk(nn.Module):
    """Parameter-free indexer of an S layer loaded from an IndexCache checkpoint: reuses its F layer's top-k.

    Reads what the F layer's attention left in the model's per-forward relay (cleared by
    `LlamaDsaForCausalLM.forward`). Under `IndexCacheModel` the wrapper's own stand-in replaces it.
    """

    def __init__(self, layer_idx: int, owner_idx: int, relay: dict[int, object]) -> None:
        super().__init__()
        self.layer_idx, self.owner_idx, self.relay = layer_idx, owner_idx, relay

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.owner_idx not in self.relay:
            raise RuntimeError(
                f"S layer {self.layer_idx} needs F layer {self.owner_idx}'s top-k, which did not run in this forward"
            )
        return self.relay[self.owner_idx]

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, reuses=layer {self.owner_idx}"


class LlamaDsaAttention(LlamaAttention):
    """LlamaAttention with a lightning indexer: each query attends only to its indexer's top-k keys.

    What differs from `LlamaAttention.forward`, and why:
    - between RoPE and the attention call it runs `self.indexer` (a `DeepseekV32Indexer`, see the module doc) on the
      normed hidden state, with the indexer's own (sub-sampled) rotary embedding;
    - exactly like transformers' DSA attentions (GLM-5, DeepSeek-V3.2), eager/sdpa apply the top-k as a boolean
      restriction of the causal mask, and every other backend gets the indexer's result as `indices=` plus the
      plain causal mask, so `IndexCacheModel`'s backend treats this family like the stock DSA ones;
    - the causal mask is always materialised (transformers skips it for sdpa without padding): the indexer must
      not score future keys, and top-k backends need it;
    - the indexer's result is left in `topk_relay` so that S layers of an IndexCache checkpoint can reuse it.
    Projections, RoPE of the attention and the KV cache are untouched, so with index_topk >= T this is the dense model.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int, topk_relay: dict[int, object] | None = None) -> None:
        super().__init__(config, layer_idx)
        indexer_config = LlamaIndexerConfig.from_llama(config)
        _check_rope_subsampling(self.head_dim, indexer_config.qk_rope_head_dim)
        self.rope_stride = (self.head_dim // 2) // (indexer_config.qk_rope_head_dim // 2)
        self.topk_relay: dict[int, object] = {} if topk_relay is None else topk_relay
        types = getattr(config, "indexer_types", None) or ["full"] * config.num_hidden_layers
        if len(types) != config.num_hidden_layers:
            raise ValueError(f"indexer_types has {len(types)} entries for {config.num_hidden_layers} layers")
        pattern = IndexCachePattern.from_indexer_types(types)
        self.indexer: nn.Module
        if pattern.is_full(layer_idx):
            self.indexer = DeepseekV32Indexer(indexer_config, layer_idx)
        else:
            self.indexer = SharedTopk(layer_idx, pattern.owner(layer_idx), self.topk_relay)

    def indexer_position_embeddings(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The attention's half-split (cos, sin) of width head_dim -> those of the indexer's roped width."""

        def subsample(table: Tensor) -> Tensor:
            freqs = table[..., : self.head_dim // 2 : self.rope_stride]
            return torch.cat([freqs, freqs], dim=-1)

        return subsample(cos), subsample(sin)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: object | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        batch, seq = input_shape
        if attention_mask is None:
            attention_mask = _causal_mask(batch, seq, key_states.shape[2], hidden_states.device)
        selection = self.indexer(
            hidden_states,
            hidden_states,  # q_resid: the normed hidden state stands in for the missing query latent
            self.indexer_position_embeddings(cos, sin),
            attention_mask[:, 0],
            kwargs.get("position_ids"),
            past_key_values=past_key_values,
        )
        self.topk_relay[self.layer_idx] = selection

        sparse_indices = None
        if self.config._attn_implementation in ("eager", "sdpa"):
            index_mask = (
                torch.ones(batch, seq, key_states.shape[2], dtype=torch.bool, device=hidden_states.device)
                .scatter(-1, selection.long(), False)
                .unsqueeze(1)
            )
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & ~index_mask
            else:
                attention_mask = attention_mask.masked_fill(index_mask, torch.finfo(attention_mask.dtype).min)
        else:
            sparse_indices = selection

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            indices=sparse_indices,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class LlamaDsaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose attentions are `LlamaDsaAttention`; config = a llama config with the DSA keys.

    Differs from the stock class only in the attention modules (swapped in before the weights are initialised or
    loaded, so `from_pretrained` fills the indexers from the checkpoint), in keeping `weights_proj` in float32 like
    transformers' DSA models, and in clearing the per-forward top-k relay after every forward (nothing a forward
    computed outlives it).
    """

    _keep_in_fp32_modules: ClassVar[list[str]] = ["indexer.weights_proj"]

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self._topk_relay: dict[int, object] = {}
        for layer_idx, layer in enumerate(self.model.layers):
            layer.self_attn = LlamaDsaAttention(config, layer_idx, self._topk_relay)
        # Initialises only the new modules (transformers skips modules it has initialised already).
        self.post_init()
        # A hook rather than a forward override keeps forward's signature, which `generate` inspects; always_call
        # clears the relay even when the forward raises.
        self.register_forward_hook(self._clear_topk_relay, always_call=True)

    def _clear_topk_relay(self, *_: object) -> None:
        self._topk_relay.clear()


def convert_llama_to_dsa(
    model_or_path: PreTrainedModel | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    index_cfg: DsaIndexConfig = SMOLLM2_INDEX,
) -> Path:
    """Dense llama checkpoint (folder or in-memory model) -> DSA llama folder; returns `out_dir`.

    Base tensors are copied byte for byte (an in-memory model is first saved with `save_pretrained`); the indexers
    are freshly initialised (`init_indexer_tensors`) in the dtype of the base weights; the source's tokenizer files
    come along. Written atomically; `out_dir` must not exist.
    """
    with tempfile.TemporaryDirectory(prefix="indexcache-llama-src-") as scratch:
        source_dir = _as_folder(model_or_path, Path(scratch))
        config = LlamaConfig.from_pretrained(source_dir)
        if any(getattr(config, key, None) is not None for key in INDEX_KEYS):
            raise ValueError(f"{source_dir} is already a DSA llama (its config has index keys)")
        dsa_config = llama_dsa_config(config, index_cfg)
        std = index_cfg.init_std or config.initializer_range
        tensors = init_indexer_tensors(
            config.num_hidden_layers, config.hidden_size, config.hidden_size, index_cfg, std, base_dtype(source_dir)
        )
        record = {"source": str(model_or_path), "source_model_type": "llama", "index": asdict(index_cfg)}
        return write_dsa_folder(source_dir, Path(out_dir), dsa_config, tensors, record)


def load_llama_dsa(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> LlamaDsaForCausalLM:
    """Rebuild a converted (or IndexCache-exported) llama DSA model from its folder, in eval mode.

    Raises if a tensor the model needs is missing from the folder (transformers would silently initialise it).
    eager by default: the teacher distributions need attention maps.
    """
    model, info = LlamaDsaForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
    )
    if info["missing_keys"]:
        raise ValueError(f"{path} lacks tensors the DSA model needs: {sorted(info['missing_keys'])[:8]}")
    return model.eval()


def _as_folder(model_or_path: PreTrainedModel | str | os.PathLike[str], scratch: Path) -> Path:
    """The source as a checkpoint folder: an in-memory model is saved into `scratch` first."""
    if isinstance(model_or_path, PreTrainedModel):
        model_or_path.save_pretrained(scratch)
        return scratch
    folder = Path(model_or_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    return folder


def base_dtype(source_dir: Path) -> torch.dtype:
    """dtype of the source's token embedding: the converted indexers are stored in the base weights' dtype."""
    for shard in _source_shards(Path(source_dir)):
        header = _read_header(shard)
        if "model.embed_tokens.weight" in header:
            return _SAFETENSORS_DTYPES[header["model.embed_tokens.weight"]["dtype"]]
    raise ValueError(f"{source_dir} has no model.embed_tokens.weight")


# ---- the registry entry --------------------------------------------------------------------------------------------
def tiny_llama_dsa_config(**overrides: object) -> LlamaConfig:
    """A tiny llama DSA config: GQA like SmolLM2, 4 indexer heads of 32 dims (8 roped), top-8.

    `overrides` may set any llama field and the index keys (index_topk, index_n_heads, index_head_dim,
    index_rope_head_dim, indexer_types).
    """
    fields: dict[str, object] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        # Wider than 0.02 for the same reason as indexcache.model.tiny: near-uniform distributions hide bugs.
        "initializer_range": 0.1,
        "index_topk": 8,
        "index_n_heads": 4,
        "index_head_dim": 32,
        "index_rope_head_dim": 8,
        **overrides,
    }
    index_cfg = DsaIndexConfig(**{key: fields.pop(key) for key in INDEX_KEYS})
    indexer_types = fields.pop("indexer_types", None)
    config = llama_dsa_config(LlamaConfig(**fields), index_cfg)
    if indexer_types is not None:
        config.indexer_types = list(indexer_types)
    return config


def _build(config: PretrainedConfig) -> PreTrainedModel:
    return LlamaDsaForCausalLM(config)


def _load(path: str | os.PathLike[str], dtype: torch.dtype) -> PreTrainedModel:
    return load_llama_dsa(path, dtype=dtype)


def dsa_attentions(model: PreTrainedModel) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers[: model.config.num_hidden_layers]]


def _install_indexers(model: PreTrainedModel) -> dict[int, nn.Module]:
    pool: dict[int, nn.Module] = {}
    for layer_idx, attention in enumerate(dsa_attentions(model)):
        # S layers of an IndexCache checkpoint have no indexer weights: nothing to train there.
        if isinstance(attention.indexer, DeepseekV32Indexer):
            attention.indexer = to_trainable(attention.indexer, TrainableDeepseekV32Indexer)
            pool[layer_idx] = attention.indexer
    return pool


def _apply_pattern(
    model: PreTrainedModel,
    pattern: IndexCachePattern,
    indexers: dict[int, nn.Module],
    shared_indexer: SharedIndexerFactory,
) -> None:
    missing = [layer for layer in pattern.full_layers if layer not in indexers]
    if missing:
        raise ValueError(
            f"pattern {pattern} makes layers {missing} F, but the checkpoint has no indexer weights for them: "
            "use a pattern whose F layers are F in the checkpoint's config.indexer_types"
        )
    model.config.indexer_types = pattern.to_indexer_types()
    for layer_idx, attention in enumerate(dsa_attentions(model)):
        if pattern.is_full(layer_idx):
            attention.indexer = indexers[layer_idx]
        else:
            attention.indexer = shared_indexer(layer_idx, pattern.owner(layer_idx))


LLAMA_DSA = register_family(
    ModelFamily(
        model_type="llama",
        build=_build,
        load=_load,
        tiny_config=tiny_llama_dsa_config,
        dsa_attentions=dsa_attentions,
        install_indexers=_install_indexers,
        apply_pattern=_apply_pattern,
        # Our loader builds no indexer on S layers (like glm_moe_dsa), so exports need none there.
        keeps_shared_indexer_tensors=False,
    )
)
