"""Serving checkpoint export (DESIGN.md section 3): the source's shards with only indexer tensors changed.

Every tensor that is not a pattern layer's indexer is copied byte for byte at the safetensors level, never through
`save_pretrained` (which drops the MTP layer `model.layers.{num_hidden_layers}.*` and re-lays out experts). F-layer
indexers get the trained values in the source's dtype; S-layer indexers are dropped, or kept for deepseek_v32 whose
transformers model builds one on every layer. The export is built in a temporary sibling directory, validated
against the source, fsynced and renamed into place, so readers see either no export or a complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from indexcache.fsutil import fsync_dir
from indexcache.pattern import IndexCachePattern
from indexcache.safetensors_io import NewTensor, ShardHeader, TensorInfo, write_safetensors
from indexcache.validate_export import (
    INDEX_FILE,
    INDEXER_PARTS,
    KEEPS_SHARED_INDEXERS,
    RECORD_FILE,
    SINGLE_FILE,
    all_tensors,
    indexer_layer,
    indexer_tensor_name,
    read_json,
    read_shards,
    serving_config,
    validate_export,
)

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Weight files of any format are never copied: the export's weights are exactly its safetensors shards.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_WRITTEN_HERE = frozenset({"config.json", INDEX_FILE, RECORD_FILE, "README.md"})


class ExportError(ValueError):
    """A bad export input; the message names the problem and the fix."""


class ExportExistsError(FileExistsError):
    """The target directory exists and overwrite was not asked for."""


@dataclass(frozen=True)
class _Source:
    directory: Path
    config: dict[str, Any]
    config_sha256: str
    shards: dict[str, ShardHeader]  # shard file name -> header, in the source's order
    index_metadata: dict[str, Any] | None  # None for a single-file checkpoint (the export stays single-file)


def export_checkpoint(
    source_dir: Path,
    target_dir: Path,
    pattern: IndexCachePattern | str,
    model_type: str,
    indexer_tensors: Mapping[str, torch.Tensor],
    summary: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the serving checkpoint for `pattern` to `target_dir` and return its path.

    `indexer_tensors` holds every F layer's trained indexer under checkpoint names
    (`model.layers.{i}.self_attn.indexer.wq_b.weight`, ...). `summary` is the training summary (JSON-serialisable),
    recorded in indexcache.json as given; its `"metrics"` entry, if any, is also recorded as the final metrics.
    With `overwrite=True` an existing target is replaced atomically (old renamed aside, new renamed in, old deleted).
    """
    # The target's last component is not resolved: a symlink there must be refused, not followed.
    source_dir = Path(source_dir).resolve()
    target_dir = Path(target_dir).absolute().parent.resolve() / Path(target_dir).name
    _check_target(source_dir, target_dir, overwrite)
    if model_type not in KEEPS_SHARED_INDEXERS:
        raise ExportError(
            f"model_type {model_type!r} has no export rule: use one of {', '.join(KEEPS_SHARED_INDEXERS)}"
        )
    source = _read_source(source_dir)
    if source.config.get("model_type") != model_type:
        raise ExportError(
            f"model_type {model_type!r} differs from the source's config.json ({source.config.get('model_type')!r}): "
            "pass the source's model_type"
        )
    pattern = _resolve_pattern(pattern, source.config.get("num_hidden_layers"))
    keep_shared = KEEPS_SHARED_INDEXERS[model_type]
    trained = _trained_tensors(all_tensors(source.shards), pattern, indexer_tensors)
    plans = _plan_shards(source, pattern, keep_shared, trained)
    record = _record_json(source, pattern, model_type, summary)

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final os.rename is atomic; the dot hides it from globbing readers.
    staging = target_dir.parent / f".{target_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        _write_shards(staging, source, plans)
        _write_text(staging / "config.json", json.dumps(serving_config(source.config, pattern), indent=2) + "\n")
        _write_text(staging / RECORD_FILE, record)
        _write_text(staging / "README.md", _model_card(source, pattern, model_type, keep_shared, summary))
        _copy_side_files(source_dir, staging)
        validate_export(staging, source_dir)
        fsync_dir(staging)
        _move_into_place(staging, target_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target_dir


def _check_target(source_dir: Path, target_dir: Path, overwrite: bool) -> None:
    if target_dir == source_dir or source_dir in target_dir.parents or (overwrite and target_dir in source_dir.parents):
        raise ExportError(f"target {target_dir} overlaps the source {source_dir}: export to a separate directory")
    if target_dir.exists() or target_dir.is_symlink():
        if not overwrite:
            raise ExportExistsError(
                f"export target {target_dir} already exists: choose a new directory, delete it, or pass overwrite=True"
            )
        if target_dir.is_symlink() or not target_dir.is_dir():
            raise ExportExistsError(f"export target {target_dir} exists and is not a directory: remove it first")


def _read_source(source_dir: Path) -> _Source:
    config_path, index_path = source_dir / "config.json", source_dir / INDEX_FILE
    if not config_path.is_file():
        raise ExportError(f"source checkpoint {source_dir} has no config.json: pass the model folder itself")
    if not (index_path.is_file() or (source_dir / SINGLE_FILE).is_file()):
        raise ExportError(
            f"source checkpoint {source_dir} has no {SINGLE_FILE} or {INDEX_FILE}: convert it to safetensors first"
        )
    try:
        config_bytes = config_path.read_bytes()
        config = json.loads(config_bytes)
        index_metadata = dict(read_json(index_path).get("metadata") or {}) if index_path.is_file() else None
    except (ValueError, AttributeError) as err:  # ExportValidationError and JSONDecodeError are ValueErrors
        raise ExportError(
            f"source checkpoint {source_dir} has unreadable JSON ({err}): repair or re-download it"
        ) from err
    if not isinstance(config, dict):
        raise ExportError(f"source checkpoint {source_dir} has a config.json that is not a JSON object")
    problems: list[str] = []
    shards = read_shards(source_dir, problems)  # the validator's layout checks, so export and validation agree
    if problems:
        raise ExportError(f"source checkpoint {source_dir} is inconsistent: {problems[0]}: repair or re-download it")
    return _Source(source_dir, config, hashlib.sha256(config_bytes).hexdigest(), shards, index_metadata)


def _resolve_pattern(pattern: IndexCachePattern | str, num_layers: Any) -> IndexCachePattern:
    if not isinstance(num_layers, int):
        raise ExportError(f"source config.json num_hidden_layers is {num_layers!r}: the source config is broken")
    if isinstance(pattern, str):
        return IndexCachePattern.parse(pattern, num_layers)  # raises a one-line ValueError naming the position
    if pattern.num_layers != num_layers:
        raise ExportError(
            f"pattern {pattern} has {pattern.num_layers} layers but the source has {num_layers} DSA layers "
            f"(num_hidden_layers): give exactly {num_layers} F/S characters"
        )
    return pattern


def _trained_tensors(
    source_tensors: Mapping[str, TensorInfo],
    pattern: IndexCachePattern,
    indexer_tensors: Mapping[str, torch.Tensor],
) -> dict[str, NewTensor]:
    """The F layers' trained indexers, checked against the source and cast to its dtype."""
    expected = [indexer_tensor_name(layer, part) for layer in pattern.full_layers for part in INDEXER_PARTS]
    unexpected = sorted(set(indexer_tensors) - set(expected))
    if unexpected:
        raise ExportError(
            f"indexer_tensors has {unexpected[0]} ({len(unexpected)} unexpected in all), which is not an F-layer "
            f"indexer tensor of pattern {pattern}: pass only the F layers' indexers (indexer_state_dict())"
        )
    missing = [name for name in expected if name not in indexer_tensors]
    if missing:
        raise ExportError(
            f"trained tensor {missing[0]} is missing ({len(missing)} missing in all): pass all "
            f"{len(INDEXER_PARTS)} indexer tensors of every F layer of pattern {pattern}"
        )
    for name, info in source_tensors.items():
        layer = indexer_layer(name, pattern.num_layers)
        if layer is not None and pattern.is_full(layer) and name not in expected:
            # e.g. FP8 weights with `weight_scale_inv`: casting trained values into them would need re-quantising.
            raise ExportError(
                f"source tensor {name} ({info.dtype}) is not one of the indexer's {', '.join(INDEXER_PARTS)}: "
                "a quantised indexer cannot take trained values; export from the BF16/FP32 checkpoint"
            )
    float_dtypes = Counter(info.dtype for info in source_tensors.values() if info.dtype in _TORCH_DTYPES)
    # Dense-to-DSA conversions have no source indexer: new tensors take the checkpoint's prevailing dtype.
    default_dtype = float_dtypes.most_common(1)[0][0] if float_dtypes else "F32"
    shapes_of_new: dict[str, tuple[int, ...]] = {}
    out = {}
    for name in expected:
        value = indexer_tensors[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ExportError(f"trained {name} is {type(value).__name__}, not a floating-point torch.Tensor")
        shape = tuple(value.shape)
        source = source_tensors.get(name)
        if source is not None and shape != source.shape:
            raise ExportError(
                f"trained {name} has shape {list(shape)} but the source's is {list(source.shape)}: "
                "pass the indexer trained for this checkpoint"
            )
        if source is None and shapes_of_new.setdefault(name.rsplit(".indexer.", 1)[1], shape) != shape:
            raise ExportError(
                f"trained {name} has shape {list(shape)}, unlike the same tensor of the other F layers: "
                "every F layer's indexer must have the same shapes"
            )
        dtype = source.dtype if source is not None else default_dtype
        if dtype not in _TORCH_DTYPES:
            raise ExportError(
                f"the source stores {name} as {dtype}; trained values can only be cast to {', '.join(_TORCH_DTYPES)}: "
                "export from the BF16/FP32 checkpoint"
            )
        if not bool(torch.isfinite(value).all()):
            raise ExportError(f"trained {name} has non-finite values: export an earlier, finite checkpoint")
        stored = value.detach().to(device="cpu", dtype=_TORCH_DTYPES[dtype]).contiguous()
        out[name] = NewTensor(dtype, shape, stored.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def _plan_shards(
    source: _Source, pattern: IndexCachePattern, keep_shared: bool, trained: Mapping[str, NewTensor]
) -> dict[str, dict[str, TensorInfo | NewTensor]]:
    """Shard file -> the tensors it will hold, in the source's order; a shard whose plan equals its source is linked."""
    plans: dict[str, dict[str, TensorInfo | NewTensor]] = {}
    for shard_name, header in source.shards.items():
        plan: dict[str, TensorInfo | NewTensor] = {}
        for name, info in header.tensors.items():
            layer = indexer_layer(name, pattern.num_layers)
            if layer is None or (not pattern.is_full(layer) and keep_shared):
                plan[name] = info
            elif pattern.is_full(layer):
                plan[name] = trained[name]
            # else: an S layer's indexer in a family that builds none there; it is left out
        plans[shard_name] = plan
    placed = {name for plan in plans.values() for name in plan}
    for name in trained:
        if name not in placed:  # an F layer the source has no indexer for: put it beside that layer's weights
            prefix = name.split(".self_attn.indexer.")[0] + "."
            shard_name = next(
                (s for s, header in source.shards.items() if any(n.startswith(prefix) for n in header.tensors)),
                next(reversed(source.shards)),
            )
            plans[shard_name][name] = trained[name]
    return plans


def _write_shards(staging: Path, source: _Source, plans: Mapping[str, Mapping[str, TensorInfo | NewTensor]]) -> None:
    for shard_name, plan in plans.items():
        header = source.shards[shard_name]
        if plan == header.tensors:
            _link_or_copy(header.path, staging / shard_name)
        else:
            write_safetensors(staging / shard_name, plan, header.metadata)
    if source.index_metadata is not None:
        metadata = dict(source.index_metadata)
        metadata["total_size"] = sum(tensor.nbytes for plan in plans.values() for tensor in plan.values())
        weight_map = {name: shard_name for shard_name, plan in plans.items() for name in plan}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        _write_text(staging / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def _record_json(source: _Source, pattern: IndexCachePattern, model_type: str, summary: Mapping[str, Any]) -> str:
    uniform = pattern.uniform_params()
    record = {
        "pattern": pattern.value,
        "model_type": model_type,
        "num_layers": pattern.num_layers,
        "retention": pattern.retention,
        "full_layers": pattern.full_layers,
        "groups": {str(owner): served for owner, served in pattern.groups.items()},
        "uniform": None if uniform is None else {"freq": uniform[0], "offset": uniform[1]},
        "source": {"path": str(source.directory), "config_sha256": source.config_sha256},
        "summary": dict(summary),
        "metrics": summary.get("metrics", {}),  # the final metrics, at the top level for quick reading
    }
    try:
        return json.dumps(record, indent=2) + "\n"
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"summary is not JSON-serialisable ({err}): pass plain numbers, strings, lists and dicts"
        ) from err


def _model_card(
    source: _Source, pattern: IndexCachePattern, model_type: str, keep_shared: bool, summary: Mapping[str, Any]
) -> str:
    shared_note = (
        "kept unchanged (transformers builds an indexer on every deepseek_v32 layer; serving ignores them)"
        if keep_shared
        else "removed"
    )
    lines = [
        "---",
        "tags: [indexcache, sparse-attention]",
        "---",
        f"# IndexCache export of `{source.directory.name}`",
        "",
        f"A `{model_type}` checkpoint where {len(pattern.full_layers)} of {pattern.num_layers} DSA layers keep their "
        f"lightning indexer (F, retention {pattern.retention:.1%}); every other layer (S) reuses the top-k indices of "
        "the nearest preceding F layer. The F indexers were trained to serve all the layers they cover.",
        "",
        f"- pattern (`index_topk_pattern`): `{pattern.value}`",
        f"- F layers: {', '.join(map(str, pattern.full_layers))}",
        f"- S-layer indexer tensors: {shared_note}",
        f"- source: `{source.directory}` (config.json sha256 `{source.config_sha256}`); every tensor other than "
        "the F-layer indexers is byte-identical to it",
        "",
        "`config.json` carries `indexer_types`, `index_topk_pattern` and `use_index_cache`; `indexcache.json` holds "
        "the groups, training summary and metrics. Check the files with "
        "`python -m indexcache.validate_export DIR --source SRC`.",
    ]
    metrics = summary.get("metrics") or {}
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def _copy_side_files(source_dir: Path, staging: Path) -> None:
    """Tokenizer, generation config, chat template, licence...: every top-level file that is not a weight."""
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.name not in _WRITTEN_HERE and not path.name.endswith(_WEIGHT_SUFFIXES):
            _copy_file(path, staging / path.name)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # an unchanged shard costs no space or time
    except OSError:  # another filesystem, or hard links not permitted
        _copy_file(source, target)


def _copy_file(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(staging: Path, target_dir: Path, overwrite: bool) -> None:
    if not (target_dir.exists() or target_dir.is_symlink()):
        os.rename(staging, target_dir)
    elif not overwrite:  # it appeared while the export was being written
        raise ExportExistsError(
            f"export target {target_dir} already exists: choose a new directory, delete it, or pass overwrite=True"
        )
    else:
        aside = target_dir.parent / f".{target_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target_dir, aside)
        try:
            os.rename(staging, target_dir)
        except BaseException:
            os.rename(aside, target_dir)
            raise
        try:
            shutil.rmtree(aside)
        except OSError as err:  # the new export is in place; only the old copy's space is lost
            logger.warning("replaced %s but could not delete its old copy %s: %s", target_dir, aside, err)
    fsync_dir(target_dir.parent)
