"""What the DSA families have in common: their attention modules, the indexer swap, and applying a pattern.

Each family file (`glm_moe_dsa.py`, `deepseek_v32.py`, `llama_dsa.py`) keeps what differs from stock and says why
in its docstring; the steps below are the ones that are the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import PreTrainedModel

from indexcache.model.indexer import to_trainable
from indexcache.model.registry import SharedIndexerFactory
from indexcache.pattern import IndexCachePattern

__all__ = ["decoder_attentions", "indexer_installer", "record_pattern_in_config", "swap_in_stand_ins"]


def decoder_attentions(model: PreTrainedModel) -> list[nn.Module]:
    """`self_attn` of every decoder layer, in order; a stored MTP layer past num_hidden_layers is not one."""
    return [layer.self_attn for layer in model.model.layers[: model.config.num_hidden_layers]]


def indexer_installer(
    stock_class: type[nn.Module], trainable_class: type[nn.Module]
) -> Callable[[PreTrainedModel], dict[int, nn.Module]]:
    """`ModelFamily.install_indexers` swapping each layer's `stock_class` indexer for a `trainable_class` one.

    A layer whose indexer is not a `stock_class` one (an S layer of an IndexCache checkpoint: none, or a
    parameter-free stand-in) has no weights to train and is left out of the returned pool.
    """

    def install(model: PreTrainedModel) -> dict[int, nn.Module]:
        pool: dict[int, nn.Module] = {}
        for layer_idx, attention in enumerate(decoder_attentions(model)):
            if isinstance(attention.indexer, stock_class):
                attention.indexer = to_trainable(attention.indexer, trainable_class)
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
