"""Model families keyed by HF `model_type`: how to build a model, make its indexers trainable and apply a pattern.

Adding a family is one file that calls `register_family` (imported by `indexcache/model/__init__.py`) plus tests.

Contract a family's attention must meet for `IndexCacheModel` (see `wrapper.py`):
- every DSA layer's attention calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with the boolean causal
  mask and `indices=` the `IndexerSelection` its indexer returned (S layers: the owning F layer's selection), and
  forwards the model's `**kwargs` to it, so the `indexcache` backend receives its per-forward context;
- `apply_pattern` leaves F layers with a trainable indexer (from `install_indexers`, named
  `...self_attn.indexer.<checkpoint names>`) and S layers with no indexer parameters in the module tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from indexcache.pattern import IndexCachePattern

# (layer_idx, owner_idx) -> a parameter-free module standing in for an S layer's indexer; it returns the owner's
# IndexerSelection. Built by the wrapper, which owns the per-forward context the stand-in reads.
SharedIndexerFactory = Callable[[int, int], nn.Module]

__all__ = ["ModelFamily", "SharedIndexerFactory", "get_family", "known_families", "register_family"]


@dataclass(frozen=True)
class ModelFamily:
    """How IndexCache drives one HF model type. Every callable acts on the HF `*ForCausalLM` model.

    Attributes:
        model_type: the HF `config.model_type` this entry serves.
        build: random-initialised model from a config (tiny tests, conversion); no download.
        load: model from a local HF folder in the given dtype.
        tiny_config: a tiny config of this family for CPU tests and defaults; keyword arguments override fields.
        dsa_attentions: the attention module of each DSA layer, in layer order (pattern position i = entry i).
        install_indexers: swap every layer's indexer for a trainable one holding the same tensors under the same
            names; returns them by layer. The wrapper keeps this pool so a pattern can be changed later.
        apply_pattern: (model, pattern, indexers from `install_indexers`, factory for S-layer stand-ins): F layers
            get their pool indexer, S layers no indexer parameters (a stand-in, or the family's own sharing).
        weights_read_outside_forward: (module, weight) pairs where `module`'s forward reads `weight` directly
            rather than through the weight's own module (the MLA latent form reads `kv_b_proj.weight`); ZeRO-3 must
            gather each for that module (`deepspeed ... register_external_parameter`). Default: none.
    """

    model_type: str
    build: Callable[[PretrainedConfig], PreTrainedModel]
    load: Callable[[str | os.PathLike[str], torch.dtype], PreTrainedModel]
    tiny_config: Callable[..., PretrainedConfig]
    dsa_attentions: Callable[[PreTrainedModel], list[nn.Module]]
    install_indexers: Callable[[PreTrainedModel], dict[int, nn.Module]]
    apply_pattern: Callable[[PreTrainedModel, IndexCachePattern, dict[int, nn.Module], SharedIndexerFactory], None]
    weights_read_outside_forward: Callable[[PreTrainedModel], list[tuple[nn.Module, nn.Parameter]]] = lambda _: []


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add `family` to the registry; registering a model_type twice is a bug, so it raises."""
    if family.model_type in _FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family
    return family


def known_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str) -> ModelFamily:
    """The family registered for `model_type`; raises ValueError listing the known ones."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} has no IndexCache family: known families are {', '.join(known_families())}"
        )
    return _FAMILIES[model_type]
