"""What the DSA families have in common: their attention modules, the indexer swap, and applying a pattern.

Each family file (`glm_moe_dsa.py`, `deepseek_v32.py`, `llama_dsa.py`) keeps what differs from stock and says why
in its docstring; the steps below are the ones that are the same for all of them, plus the weight-absorbed
(latent) attention the two MLA families share (`LatentMlaAttention`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from indexcache.model.context import CONTEXT_KWARG
from indexcache.model.indexer import IndexerSelection, rebuild_as
from indexcache.model.registry import SharedIndexerFactory
from indexcache.pattern import IndexCachePattern

__all__ = [
    "LatentMlaAttention",
    "decoder_attentions",
    "indexer_installer",
    "latent_weights",
    "record_pattern_in_config",
    "swap_in_stand_ins",
]

RopeFn = Callable[..., tuple[Tensor, Tensor]]
# Sparse mode absorbs the queries into the latent space this many rows at a time, straight into the [B, T, H, 576]
# query: a whole-sequence temporary [B, T, H, 512] would be 16 GiB at 256K tokens for GLM-5.
LATENT_ROW_CHUNK = 8192


class LatentMlaAttention:
    """What the MLA families' IndexCache attentions add to the stock MLA attention (mixed in before it).

    The stock forward expands every token's latent into per-head keys and values (`expand_kv`, through
    `kv_b_proj`) before the attention function sees them, so a gather-based sparse kernel would read each
    (row, head)'s own keys. In sparse mode this attends in the weight-absorbed form serving engines use (docs/DESIGN.md
    section 5): each head's no-RoPE query goes through the key half of `kv_b_proj` (W_uk) into the latent space, the
    key is the token's shared 576-wide latent (normed kv_lora 512 + RoPE 64, one KV head), the value the latent's
    first 512 columns, and the 512-wide output of each head comes back through the value half (W_uv). Scores,
    probabilities, LSE and output equal the expanded form's up to round-off:
        q_nope . (W_uk c) = (W_uk^T q_nope) . c   and   sum_s p_s (W_uv c_s) = W_uv (sum_s p_s c_s).
    Dense mode keeps the stock expanded form (the flash kernel takes q.k width 256 with per-head keys, not 576).
    Parameters, their names and the checkpoint are the stock ones; no KV cache (training runs whole sequences).
    """

    def latent_projections(
        self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], rope: RopeFn
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The stock projections: q_resid [B, T, q_lora], q_pass [B, H, T, nope], q_rot [B, H, T, rope] and the
        latents k_pass [B, 1, T, kv_lora], k_rot [B, 1, T, rope] (after the family's RoPE)."""
        batch, seq = hidden_states.shape[:-1]
        q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
        q_states = self.q_b_proj(q_resid).view(batch, seq, -1, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_pass, k_rot = torch.split(
            self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )
        k_pass = self.kv_a_layernorm(kv_pass).view(batch, 1, seq, self.kv_lora_rank)
        cos, sin = position_embeddings
        q_rot, k_rot = rope(q_rot, k_rot.view(batch, 1, seq, self.qk_rope_head_dim), cos, sin)
        return q_resid, q_pass, q_rot, k_pass, k_rot

    def attend(
        self,
        q_pass: Tensor,
        q_rot: Tensor,
        k_pass: Tensor,
        k_rot: Tensor,
        selection: IndexerSelection,
        attention_mask: Tensor | None,
        **kwargs: object,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention output after `o_proj` [B, T, hidden]: latent form in sparse mode, stock expanded form otherwise."""
        batch, _, seq, _ = q_pass.shape
        context = kwargs.get(CONTEXT_KWARG)
        interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        dropout = 0.0 if not self.training else self.attention_dropout
        latent = context is not None and context.mode == "sparse"
        if context is not None and context.shard is not None:
            # Context parallelism: the whole sequence's latents (576 values a token), the only tensor of this
            # attention that crosses ranks; in dense mode every rank expands the gathered latents itself.
            rank = self.kv_lora_rank
            k_pass, k_rot = context.gather_keys(torch.cat((k_pass, k_rot), dim=-1), dim=2).split(
                [rank, k_rot.shape[-1]], dim=-1
            )
        if latent:
            kv_b = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
            w_uk, w_uv = kv_b[:, : self.qk_nope_head_dim], kv_b[:, self.qk_nope_head_dim :]
            # Token-major [B, T, H, 576] underneath: the backend's transposes then give contiguous rows to gather.
            rank = self.kv_lora_rank
            query = q_pass.new_empty(batch, seq, q_pass.shape[1], rank + q_rot.shape[-1])
            for start in range(0, seq, LATENT_ROW_CHUNK):
                rows = slice(start, start + LATENT_ROW_CHUNK)
                query[:, rows, :, :rank] = torch.einsum("bhtn,hnc->bthc", q_pass[:, :, rows], w_uk)
            query[..., rank:] = q_rot.transpose(1, 2)
            query = query.transpose(1, 2)
            key = torch.cat((k_pass, k_rot), dim=-1)  # [B, 1, S, 576]: one head, so token-major already
            value = key[..., : self.kv_lora_rank]
        else:
            query = torch.cat((q_pass, q_rot), dim=-1)
            key, value = self.expand_kv(k_pass, k_rot)
        output, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            indices=selection,
            **kwargs,
        )
        if latent:  # each head's 512-wide latent output back up through the value half of kv_b_proj
            output = torch.einsum("bthc,hvc->bthv", output, w_uv)
        return self.o_proj(output.reshape(batch, seq, -1)), weights


def latent_weights(model: PreTrainedModel) -> list[tuple[nn.Module, nn.Parameter]]:
    """`ModelFamily.weights_read_outside_forward` of the MLA families: the latent form reads `kv_b_proj.weight`."""
    return [(attention, attention.kv_b_proj.weight) for attention in decoder_attentions(model)]


def decoder_attentions(model: PreTrainedModel) -> list[nn.Module]:
    """`self_attn` of every decoder layer, in order; a stored MTP layer past num_hidden_layers is not one."""
    return [layer.self_attn for layer in model.model.layers[: model.config.num_hidden_layers]]


def indexer_installer(
    stock_class: type[nn.Module], trainable_class: type[nn.Module], attention_class: type[nn.Module] | None = None
) -> Callable[[PreTrainedModel], dict[int, nn.Module]]:
    """`ModelFamily.install_indexers` swapping each layer's `stock_class` indexer for a `trainable_class` one.

    A layer whose indexer is not a `stock_class` one (an S layer of an IndexCache checkpoint: none, or a
    parameter-free stand-in) has no weights to train and is left out of the returned pool. With
    `attention_class` (a subclass of the stock attention), each layer's attention is first rebuilt as one, from
    its own submodules (`rebuild_as`: same parameters, same names).
    """

    def install(model: PreTrainedModel) -> dict[int, nn.Module]:
        if attention_class is not None:
            for layer in model.model.layers[: model.config.num_hidden_layers]:
                layer.self_attn = rebuild_as(layer.self_attn, attention_class)
        pool: dict[int, nn.Module] = {}
        for layer_idx, attention in enumerate(decoder_attentions(model)):
            if isinstance(attention.indexer, stock_class):
                attention.indexer = rebuild_as(attention.indexer, trainable_class)
                pool[layer_idx] = attention.indexer
        return pool

    return install


def record_pattern_in_config(
    model: PreTrainedModel, pattern: IndexCachePattern, indexers: dict[int, nn.Module]
) -> None:
    """For families whose config lists `indexer_types`: check every F layer has indexer weights, then record it.

    The config then describes the live model (a `save_pretrained` of it rebuilds the same sharing).
    """
    missing = [layer for layer in pattern.full_layers if layer not in indexers]
    if missing:
        raise ValueError(
            f"pattern {pattern} makes layers {missing} F, but the checkpoint has no indexer weights for them: "
            "use a pattern whose F layers are F in the checkpoint's config.indexer_types"
        )
    model.config.indexer_types = pattern.to_indexer_types()


def swap_in_stand_ins(
    model: PreTrainedModel,
    pattern: IndexCachePattern,
    indexers: dict[int, nn.Module],
    shared_indexer: SharedIndexerFactory,
) -> None:
    """F layers get their pool indexer, S layers the wrapper's parameter-free stand-in for their F layer's."""
    for layer_idx, attention in enumerate(decoder_attentions(model)):
        if pattern.is_full(layer_idx):
            attention.indexer = indexers[layer_idx]
        else:
            attention.indexer = shared_indexer(layer_idx, pattern.owner(layer_idx))
