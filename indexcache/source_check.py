"""The tensors a model expects against those its checkpoint folder holds, read from headers before any weight loads.

transformers fills a tensor that a checkpoint lacks with its random init and says so only in a log line, so a source
with an incomplete shard would train (and export) a model with random weights in it. Here the model is built from
the folder's config.json on the meta device (no memory, no weights), its parameter names are turned into the
checkpoint's names by transformers' own reverse weight conversion (fused experts back to one tensor per expert, as
`save_pretrained` writes them), and each one must be in the folder's shards with the same shape. Tensors the model
does not build (the MTP layer `model.layers.{num_hidden_layers}.*`) may be there; they pass through the export.

Only tensors that a conversion created are new: a dense model converted to DSA gets fresh indexers
(`initialised_tensors` names them, and the run's record carries the list); nothing else is ever initialised.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.integrations import deepspeed as hf_deepspeed

from indexcache.conversion.convert import CONVERSION_RECORD, INDEXER_SHARD
from indexcache.model import get_family, known_families
from indexcache.safetensors_io import INDEX_FILE, SafetensorsFormatError, TensorInfo, read_header

__all__ = ["SourceTensorError", "check_source_tensors", "expected_tensors", "initialised_tensors"]

SINGLE_FILE = "model.safetensors"


class SourceTensorError(ValueError):
    """A checkpoint folder that lacks (or misshapes) a tensor its model needs; one line naming tensor and file."""


def expected_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor the model built from `folder`'s config.json must load.

    DSA folders are built by their IndexCache family; a dense folder (a conversion's source) by transformers' own
    class for its model_type. Tied weights whose source is loaded and keys the model declares optional are left out.
    """
    config = AutoConfig.from_pretrained(folder)
    with _without_zero3_construction(), torch.device("meta"):
        model = _build(config)
    names = {name: tuple(value.shape) for name, value in revert_weight_conversion(model, model.state_dict()).items()}
    optional = [re.compile(pattern) for pattern in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return {
        name: shape
        for name, shape in names.items()
        if name not in tied and not any(pattern.search(name) for pattern in optional)
    }


@contextmanager
def _without_zero3_construction() -> Iterator[None]:
    """transformers' plain construction for the meta-device skeleton, also inside a ZeRO-3 job.

    While a job holds its `HfDeepSpeedConfig` (ZeRO-3 training, search or evaluation; an export at the end of such a
    run), transformers builds every model under `deepspeed.zero.Init`, which partitions real tensors and cannot
    build on the meta device. transformers keeps that config behind a module-level weak reference only
    (`set_hf_deepspeed_config` / `unset_hf_deepspeed_config`); it is unset for the skeleton and set back after.
    """
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = reference() if reference is not None else None
    if active is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def _build(config: PretrainedConfig) -> PreTrainedModel:
    if config.model_type in known_families() and getattr(config, "index_topk", None) is not None:
        return get_family(config.model_type).build(config)
    return AutoModelForCausalLM.from_config(config)


def stored_tensors(folder: Path, what: str = "model.source") -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """(name -> where each stored tensor is, the index's weight_map or None for one file), from headers only."""
    index_path = folder / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise SourceTensorError(
                f"{what}={folder}: {INDEX_FILE} is not a shard index ({error!r}): repair or re-download it"
            ) from None
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        shard_names = [SINGLE_FILE]
    else:
        raise SourceTensorError(f"{what}={folder} has no {SINGLE_FILE} or {INDEX_FILE}: convert the checkpoint first")
    stored: dict[str, TensorInfo] = {}
    for shard in shard_names:
        if not (folder / shard).is_file():
            raise SourceTensorError(
                f"{what}={folder}: {INDEX_FILE} names shard {shard}, which does not exist: re-download it"
            )
        try:
            stored.update(read_header(folder / shard).tensors)
        except SafetensorsFormatError as error:
            raise SourceTensorError(f"{what}={folder} could not be loaded ({error}): re-download that shard") from None
    return stored, weight_map


def check_source_tensors(folder: Path, what: str = "model.source") -> None:
    """Raise SourceTensorError (one line: the tensor, the file, how many) unless `folder` holds every tensor its
    model expects, in the expected shape."""
    folder = Path(folder)
    expected = expected_tensors(folder)
    stored, weight_map = stored_tensors(folder, what)
    missing = [name for name in expected if name not in stored]
    if missing:
        name = missing[0]
        raise SourceTensorError(
            f"{what}={folder}: tensor {name} is missing from {_where(name, stored, weight_map)} ({len(missing)} of "
            f"the {len(expected)} tensors the {_model_type(folder)} model needs are missing): the checkpoint is "
            "incomplete; re-download it"
        )
    for name, shape in expected.items():
        if stored[name].shape != shape:
            raise SourceTensorError(
                f"{what}={folder}: tensor {name} in {stored[name].path.name} has shape {list(stored[name].shape)}, "
                f"the model built from config.json needs {list(shape)}: config.json and the weights disagree"
            )


def _where(name: str, stored: Mapping[str, TensorInfo], weight_map: Mapping[str, str] | None) -> str:
    """The file a missing tensor belongs in: the shard the index names, else the one holding its module's siblings."""
    if weight_map is None:
        return SINGLE_FILE
    if name in weight_map:
        return f"{weight_map[name]}, where {INDEX_FILE} puts it"
    module = name.rsplit(".", 2)[0] + "."
    siblings = Counter(info.path.name for other, info in stored.items() if other.startswith(module))
    if siblings:
        return f"{siblings.most_common(1)[0][0]} (with the rest of {module}*) and from {INDEX_FILE}"
    return f"every shard and {INDEX_FILE}"


def _model_type(folder: Path) -> str:
    return str(json.loads((folder / "config.json").read_text()).get("model_type"))


def initialised_tensors(folder: Path) -> list[str]:
    """The tensors of a DSA folder that a dense-to-DSA conversion initialised (its fresh indexers); [] otherwise."""
    folder = Path(folder)
    if not (folder / CONVERSION_RECORD).is_file() or not (folder / INDEXER_SHARD).is_file():
        return []
    return sorted(read_header(folder / INDEXER_SHARD).tensors)
