"""The trained tensors of a model, as the export reads them: one parameter at a time, gathered under ZeRO-3.

`collect_trained_tensors` (on the writing rank) streams (checkpoint name, CPU tensor) pairs into
`indexcache.export.export_checkpoint`; `join_trained_gathers` keeps every other rank in step with its gathers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from indexcache.export import ExportError
from indexcache.model import IndexCacheModel
from indexcache.validate_export import TRAINED_GROUPS


def collect_trained_tensors(model: IndexCacheModel, groups: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, CPU tensor) for every parameter of `groups` ("indexers", "base"), one at a time.

    Parameters are taken one by one from `model.trainable_parameters(groups)`. A ZeRO-3 partitioned parameter is
    gathered alone, copied to CPU and released before the next is gathered, and the consumer (the export's spool)
    writes each value before asking for the next: memory stays at one full parameter whatever the model's size.
    The gathers are collectives, so under ZeRO-3 every rank takes part, in step: the writing rank hands this
    generator to `export_checkpoint` (which runs it to its end even when it fails), the others call
    `join_trained_gathers` with the same model and groups.

    Fused parameters (transformers 5.23 stores a layer's experts as one `gate_up_proj` / `down_proj` tensor) come
    out in the checkpoint's layout and names (`mlp.experts.{e}.gate_proj.weight`, ...), converted by transformers'
    own reverse weight conversion, the one `save_pretrained` applies.
    """
    from transformers.core_model_loading import revert_weight_conversion

    unknown = set(groups) - set(TRAINED_GROUPS)
    if unknown:
        raise ExportError(f"trained groups {sorted(unknown)} are unknown: use any of {list(TRAINED_GROUPS)}")
    for name, param in model.trainable_parameters(tuple(groups)):
        value = _full_cpu_copy(param)
        yield from revert_weight_conversion(model.hf_model, {name: value}).items()
        del value


def join_trained_gathers(model: IndexCacheModel, groups: Sequence[str]) -> None:
    """On a rank that does not write the export: take part in each ZeRO-3 gather `collect_trained_tensors` makes.

    Same parameters, same order, so the collectives pair up; nothing is copied or kept (on GLM-5 one layer's fused
    experts are about 13 GB, which only the writing rank needs on the host). Without ZeRO-3 it does nothing.
    """
    partitioned = [param for _, param in model.trainable_parameters(tuple(groups)) if hasattr(param, "ds_id")]
    if not partitioned:
        return
    import deepspeed

    for param in partitioned:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            pass


def _full_cpu_copy(param: torch.nn.Parameter) -> torch.Tensor:
    if not hasattr(param, "ds_id"):  # not partitioned by ZeRO-3: the local tensor is the whole parameter
        return param.detach().to("cpu", copy=True)
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().to("cpu", copy=True)
