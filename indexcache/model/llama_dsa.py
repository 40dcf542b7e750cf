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

Default indexer shape for SmolLM2 (`conversion.llama.SMOLLM2_INDEX`: 4 heads x 64, 32 roped dims, top-256): the
GLM-5 / DeepSeek-V3.2 proportions scaled down: about half as many indexer heads as attention heads (9), an
indexer width equal to the attention head width (64), half of it roped (GLM-5: 64 of 128). top-256 is 1/32 of
SmolLM2's 8K context; set `index_topk` below the training sequence length or sparse training is dense.

Converted folders keep `model_type: llama`: `config.json` gains `index_topk`, `index_n_heads`, `index_head_dim`,
`index_rope_head_dim`, `indexer_types` (all "full" after conversion) and `layer_types` ("indexed_attention", which
makes transformers' cache keep the indexer keys during generation). Base tensors are copied byte for byte; the
indexer tensors sit in their own shard. Stock `LlamaForCausalLM` still loads the folder (it ignores the indexer);
`load_llama_dsa` rebuilds the DSA model.

The conversion (the dense config's DSA keys, `init_indexer_tensors`, `write_dsa_folder`) lives in
indexcache/conversion/ (llama.py, convert.py); the indexers' shape, `DsaIndexConfig`, in model/dsa_config.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
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

from indexcache.model.context import CONTEXT_KWARG
from indexcache.model.dsa_config import DsaIndexConfig
from indexcache.model.families_common import (
    decoder_attentions,
    indexer_installer,
    record_pattern_in_config,
    swap_in_stand_ins,
)
from indexcache.model.indexer import TrainableDeepseekV32Indexer
from indexcache.model.registry import ModelFamily, SharedIndexerFactory, register_family
from indexcache.pattern import IndexCachePattern

__all__ = [
    "LlamaDsaAttention",
    "LlamaDsaForCausalLM",
    "LlamaIndexerConfig",
    "SharedTopk",
    "load_llama_dsa",
    "tiny_llama_dsa_config",
]

INDEX_KEYS = ("index_topk", "index_n_heads", "index_head_dim", "index_rope_head_dim")


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
                "indexcache.conversion.llama.convert_llama_to_dsa"
            )
        return cls(
            hidden_size=config.hidden_size,
            index_n_heads=config.index_n_heads,
            index_head_dim=config.index_head_dim,
            qk_rope_head_dim=config.index_rope_head_dim,
            index_topk=config.index_topk,
            q_lora_rank=config.hidden_size,
        )


def llama_index_rope_dim(index_cfg: DsaIndexConfig) -> int:
    """The llama conversion's roped indexer width: `index_rope_head_dim`, by default half the indexer head."""
    return index_cfg.index_rope_head_dim or index_cfg.index_head_dim // 2


def check_rope_subsampling(head_dim: int, rope_dim: int) -> None:
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
    - under eager/sdpa the causal mask is always materialised (transformers skips it for sdpa without padding): the
      stock indexer must not score future keys. Under the `indexcache` backend the layer gets that backend's [B, S]
      padding mask (or None) and hands it to the trainable indexer as is: it is causal by construction, and no
      [T, S] mask is built;
    - the indexer's result is left in `topk_relay` so that S layers of an IndexCache checkpoint can reuse it.
    Projections, RoPE of the attention and the KV cache are untouched, so with index_topk >= T this is the dense model.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int, topk_relay: dict[int, object] | None = None) -> None:
        super().__init__(config, layer_idx)
        indexer_config = LlamaIndexerConfig.from_llama(config)
        check_rope_subsampling(self.head_dim, indexer_config.qk_rope_head_dim)
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
        stock_mask = self.config._attn_implementation in ("eager", "sdpa")
        if stock_mask and attention_mask is None:
            attention_mask = _causal_mask(batch, seq, key_states.shape[2], hidden_states.device)
        context = kwargs.get(CONTEXT_KWARG)
        indexer_kwargs = {} if context is None else {"context": context}
        selection = self.indexer(
            hidden_states,
            hidden_states,  # q_resid: the normed hidden state stands in for the missing query latent
            self.indexer_position_embeddings(cos, sin),
            attention_mask[:, 0] if stock_mask else attention_mask,
            kwargs.get("position_ids"),
            past_key_values=past_key_values,
            **indexer_kwargs,
        )
        if context is not None and context.shard is not None:
            # Context parallelism: the whole sequence's KV heads, the only tensors of this attention that cross ranks.
            key_states = context.gather_keys(key_states, dim=2)
            value_states = context.gather_keys(value_states, dim=2)
        self.topk_relay[self.layer_idx] = selection

        sparse_indices = None
        if stock_mask:
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
    transformers' DSA models, and in clearing the per-forward top-k relay after every forward of the decoder
    (`self.model`, which `IndexCacheModel` runs without the head): nothing a forward computed outlives it.
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
        self.model.register_forward_hook(self._clear_topk_relay, always_call=True)

    def _clear_topk_relay(self, *_: object) -> None:
        self._topk_relay.clear()


def load_llama_dsa(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> LlamaDsaForCausalLM:
    """Rebuild a converted (or IndexCache-exported) llama DSA model from its folder, in eval mode.

    Raises if a tensor the model needs is missing from the folder (transformers would silently initialise it).
    Eager attention by default: transformers' plain reference kernel, which can also return attention maps;
    `IndexCacheModel` replaces it with its own backend.
    """
    model, info = LlamaDsaForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
    )
    if info["missing_keys"]:
        raise ValueError(f"{path} lacks tensors the DSA model needs: {sorted(info['missing_keys'])[:8]}")
    return model.eval()


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
    index_cfg = DsaIndexConfig(**{key: fields.pop(key) for key in INDEX_KEYS})  # checks the indexer's shape
    num_layers = int(fields["num_hidden_layers"])  # type: ignore[call-overload]
    indexer_types = list(fields.pop("indexer_types", None) or ["full"] * num_layers)  # type: ignore[call-overload]
    rope = llama_index_rope_dim(index_cfg)
    check_rope_subsampling(int(fields["head_dim"]), rope)  # type: ignore[call-overload]
    return LlamaConfig(
        **fields,
        index_topk=index_cfg.index_topk,
        index_n_heads=index_cfg.index_n_heads,
        index_head_dim=index_cfg.index_head_dim,
        index_rope_head_dim=rope,
        indexer_types=indexer_types,
        # transformers' DynamicCache gives "indexed_attention" layers the indexer key cache DeepseekV32Indexer uses.
        layer_types=["indexed_attention"] * num_layers,
        architectures=[LlamaDsaForCausalLM.__name__],
    )


def _build(config: PretrainedConfig) -> PreTrainedModel:
    return LlamaDsaForCausalLM(config)


def _load(path: str | os.PathLike[str], dtype: torch.dtype) -> PreTrainedModel:
    return load_llama_dsa(path, dtype=dtype)


def _apply_pattern(
    model: PreTrainedModel,
    pattern: IndexCachePattern,
    indexers: dict[int, nn.Module],
    shared_indexer: SharedIndexerFactory,
) -> None:
    # Like glm_moe_dsa, the config lists indexer_types (our loader builds S layers from it); like deepseek_v32, S
    # layers get the wrapper's stand-in (it also replaces the SharedTopk of a checkpoint loaded with S layers).
    record_pattern_in_config(model, pattern, indexers)
    swap_in_stand_ins(model, pattern, indexers, shared_indexer)


LLAMA_DSA = register_family(
    ModelFamily(
        model_type="llama",
        build=_build,
        load=_load,
        tiny_config=tiny_llama_dsa_config,
        dsa_attentions=decoder_attentions,
        install_indexers=indexer_installer(DeepseekV32Indexer, TrainableDeepseekV32Indexer),
        apply_pattern=_apply_pattern,
        # Our loader builds no indexer on S layers (like glm_moe_dsa), so exports need none there.
    )
)
