"""Serving checkpoint export (docs/DESIGN.md section 3): the source's shards with only what the run trained changed.

Every tensor the run did not train is copied byte for byte at the safetensors level, never through
`save_pretrained` (which drops the MTP layer `model.layers.{num_hidden_layers}.*` and re-lays out experts). Trained
tensors (the F layers' indexers, and the base when a stage trained it) replace the source's under the same names,
in the source's dtype and shard; S-layer indexers are dropped, or kept for deepseek_v32 whose transformers model
builds one on every layer. Every tensor written or copied gets its sha256 recorded (CHECKSUM_FILE), so the export
can be checked with no source at hand.

Trained values arrive as a stream of (checkpoint name, tensor) pairs (`export_gather.collect_trained_tensors`, one
parameter at a time) and are spooled to a raw file in the staging directory as they come, so no rank ever holds
more than one trained parameter however large the base: shards are then assembled from the spool and the source by
byte ranges.
The export is built in a temporary sibling directory, validated, fsynced and renamed into place, so readers see
either no export or a complete one; temporary directories a killed export left beside the target are removed by
the next export to it. What the export records about itself (indexcache.json, the model card): export_record.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from indexcache.export_record import model_card, record_json
from indexcache.fsutil import STAGING_TAG, dir_lock, staged_dir
from indexcache.pattern import IndexCachePattern
from indexcache.safetensors_io import (
    FLOAT_DTYPES,
    INDEX_FILE,
    ShardHeader,
    TensorInfo,
    tensor_sha256,
    torch_dtype,
    write_safetensors,
)
from indexcache.validate_export import (
    CHECKSUM_FILE,
    INDEXER_PARTS,
    KEEPS_SHARED_INDEXERS,
    RECORD_FILE,
    SINGLE_FILE,
    TRAINED_GROUPS,
    all_tensors,
    indexer_layer,
    indexer_tensor_name,
    read_json,
    read_shards,
    serving_config,
    validate_export,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# Weight files of any format are never copied: the export's weights are exactly its safetensors shards.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_WRITTEN_HERE = frozenset({"config.json", INDEX_FILE, RECORD_FILE, CHECKSUM_FILE, "README.md"})
_SPOOL = ".trained-values.spool"  # raw bytes of the trained tensors, inside the staging directory

TrainedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


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


@dataclass(frozen=True)
class _Spooled:
    info: TensorInfo  # where the trained value's bytes (already in the stored dtype) sit in the spool
    group: str  # "indexers" or "base"


def export_checkpoint(
    source_dir: Path,
    target_dir: Path,
    pattern: IndexCachePattern | str,
    model_type: str,
    trained: TrainedTensors,
    summary: Mapping[str, Any],
    *,
    trained_groups: Sequence[str] = ("indexers",),
    overwrite: bool = False,
) -> Path:
    """Write the serving checkpoint for `pattern` to `target_dir` and return its path.

    `trained` holds what the run trained under checkpoint names, as a mapping or as a stream of (name, tensor)
    pairs (`collect_trained_tensors`): with "indexers" in `trained_groups`, all of every F layer's indexer
    (`model.layers.{i}.self_attn.indexer.wq_b.weight`, ...); with "base", the base tensors the run trained, each
    one a tensor of the source (not the MTP layer). indexcache.json records `trained_groups`. A stream is consumed
    to its end even when the export fails, so ranks gathering with this one are never left waiting.
    `summary` is the training summary (JSON-serialisable), recorded in indexcache.json as given; its `"metrics"`
    entry, if any, is also recorded as the final metrics. With `overwrite=True` an existing target is replaced
    atomically (old renamed aside, new renamed in, old deleted).
    """
    try:
        return _export(source_dir, target_dir, pattern, model_type, trained, summary, tuple(trained_groups), overwrite)
    except Exception:
        if not isinstance(trained, Mapping):
            for _ in trained:  # finish the stream: under ZeRO-3 the other ranks are gathering in step with it
                pass
        raise


def _export(
    source_dir: Path,
    target_dir: Path,
    pattern: IndexCachePattern | str,
    model_type: str,
    trained: TrainedTensors,
    summary: Mapping[str, Any],
    groups: tuple[str, ...],
    overwrite: bool,
) -> Path:
    # The target's last component is not resolved: a symlink there must be refused, not followed.
    source_dir = Path(source_dir).resolve()
    target_dir = Path(target_dir).absolute().parent.resolve() / Path(target_dir).name
    _check_target(source_dir, target_dir, overwrite)
    if not groups or not set(groups) <= set(TRAINED_GROUPS):
        raise ExportError(f"trained_groups={list(groups)} must name one or more of {list(TRAINED_GROUPS)}")
    if model_type not in KEEPS_SHARED_INDEXERS:
        raise ExportError(
            f"model_type {model_type!r} has no export rule: use one of {', '.join(KEEPS_SHARED_INDEXERS)}"
        )
    _check_json(summary)
    source = _read_source(source_dir)
    if source.config.get("model_type") != model_type:
        raise ExportError(
            f"model_type {model_type!r} differs from the source's config.json ({source.config.get('model_type')!r}): "
            "pass the source's model_type"
        )
    pattern = _resolve_pattern(pattern, source.config.get("num_hidden_layers"))
    keep_shared = KEEPS_SHARED_INDEXERS[model_type]
    source_tensors = all_tensors(source.shards)
    if "indexers" in groups:
        _check_indexers_take_values(source_tensors, pattern)
    if "base" in groups:
        _check_base_takes_values(source_tensors, pattern)

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # One export per target directory at a time; under the lock no live export's staging can be mistaken for stale.
    with dir_lock(target_dir.parent):
        _remove_stale_staging(target_dir)
        try:
            with staged_dir(target_dir, if_exists="replace" if overwrite else "error") as staging:
                spooled = _spool_trained(staging / _SPOOL, trained, source_tensors, pattern, groups)
                plans = _plan_shards(source, pattern, keep_shared, spooled)
                checksums = _write_shards(staging, source, plans, spooled)
                (staging / _SPOOL).unlink()
                checksum_text = json.dumps({"algorithm": "sha256", "tensors": checksums}, indent=1) + "\n"
                _write_text(staging / CHECKSUM_FILE, checksum_text)
                record = record_json(
                    source.directory,
                    source.config_sha256,
                    pattern,
                    model_type,
                    summary,
                    groups,
                    checksum_text,
                    checksums,
                )
                config_text = json.dumps(serving_config(source.config, pattern), indent=2) + "\n"
                _write_text(staging / "config.json", config_text)
                _write_text(staging / RECORD_FILE, record)
                card = model_card(
                    source.directory, source.config_sha256, pattern, model_type, keep_shared, summary, groups
                )
                _write_text(staging / "README.md", card)
                _copy_side_files(source_dir, staging)
                validate_export(staging, source_dir)
        except FileExistsError:  # it appeared while the export was being written
            raise ExportExistsError(
                f"export target {target_dir} already exists: choose a new directory, delete it, or pass overwrite=True"
            ) from None
    return target_dir


def _remove_stale_staging(target_dir: Path) -> None:
    """Delete what killed exports to `target_dir` left beside it (called under the directory lock).

    Only exact matches of this module's own names are touched: `.{name}.tmp-{12 hex}` staging directories, and
    `.{name}.old-{12 hex}` copies of a replaced export once the new one is in place (if the target is missing, an
    `.old-` copy may be the only complete export, so it is kept and reported).
    """
    for path in target_dir.parent.iterdir():
        kind, _, tag = path.name.removeprefix(f".{target_dir.name}.").partition("-")
        if not path.name.startswith(f".{target_dir.name}.") or kind not in ("tmp", "old"):
            continue
        if not STAGING_TAG.fullmatch(tag) or path.is_symlink() or not path.is_dir():
            continue
        if kind == "old" and not target_dir.is_dir():
            logger.warning("%s may hold the only complete export of %s: kept; rename it back if so", path, target_dir)
            continue
        logger.warning("removing %s, left by an export that was killed", path)
        shutil.rmtree(path)


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


def _check_json(summary: Mapping[str, Any]) -> None:
    try:
        json.dumps(dict(summary))
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"summary is not JSON-serialisable ({err}): pass plain numbers, strings, lists and dicts"
        ) from err


def _check_indexers_take_values(source_tensors: Mapping[str, TensorInfo], pattern: IndexCachePattern) -> None:
    expected = set(INDEXER_PARTS)
    for name, info in source_tensors.items():
        layer = indexer_layer(name, pattern.num_layers)
        if layer is not None and pattern.is_full(layer) and name.rsplit(".indexer.", 1)[1] not in expected:
            # e.g. FP8 weights with `weight_scale_inv`: casting trained values into them would need re-quantising.
            raise ExportError(
                f"source tensor {name} ({info.dtype}) is not one of the indexer's {', '.join(INDEXER_PARTS)}: "
                "a quantised indexer cannot take trained values; export from the BF16/FP32 checkpoint"
            )


def _check_base_takes_values(source_tensors: Mapping[str, TensorInfo], pattern: IndexCachePattern) -> None:
    """Refuse a quantised base before anything is gathered or written (a 744B stream would fail hours in)."""
    for name, info in source_tensors.items():
        mtp = re.match(r"model\.layers\.(\d+)\.", name)
        if info.dtype in FLOAT_DTYPES or (mtp is not None and int(mtp.group(1)) >= pattern.num_layers):
            continue
        if indexer_layer(name, pattern.num_layers) is None and info.dtype not in ("I64", "I32", "U8", "BOOL"):
            raise ExportError(
                f"source tensor {name} is stored as {info.dtype}: a trained base cannot be cast into it; "
                "export from the BF16/FP32 checkpoint"
            )


def _group_of(name: str, pattern: IndexCachePattern, source_tensors: Mapping[str, TensorInfo]) -> str:
    """Which trained group `name` belongs to; raises ExportError for a name no run can train."""
    layer = indexer_layer(name, pattern.num_layers)
    if layer is not None:
        if not pattern.is_full(layer):
            raise ExportError(
                f"trained tensor {name} is not an F-layer indexer tensor of pattern {pattern}: pass only the F "
                "layers' indexers (S layers have none to train)"
            )
        return "indexers"
    if name not in source_tensors:
        raise ExportError(
            f"trained tensor {name} is not a tensor of the source checkpoint: pass checkpoint names "
            "(collect_trained_tensors converts fused parameters to them)"
        )
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if match is not None and int(match.group(1)) >= pattern.num_layers:
        raise ExportError(
            f"trained tensor {name} belongs to the MTP layer, which the training model does not build: leave it out"
        )
    return "base"


def _spool_trained(
    spool: Path,
    trained: TrainedTensors,
    source_tensors: Mapping[str, TensorInfo],
    pattern: IndexCachePattern,
    groups: tuple[str, ...],
) -> dict[str, _Spooled]:
    """Check each trained value, cast it to the stored dtype and append its bytes to `spool`, one at a time."""
    float_dtypes = Counter(info.dtype for info in source_tensors.values() if info.dtype in FLOAT_DTYPES)
    # Dense-to-DSA conversions have no source indexer: new tensors take the checkpoint's prevailing dtype.
    default_dtype = float_dtypes.most_common(1)[0][0] if float_dtypes else "F32"
    shapes_of_new: dict[str, tuple[int, ...]] = {}
    spooled: dict[str, _Spooled] = {}
    items = trained.items() if isinstance(trained, Mapping) else trained
    with open(spool, "xb") as out:
        for name, value in items:
            group = _group_of(name, pattern, source_tensors)
            if group not in groups:
                raise ExportError(
                    f"trained tensor {name} is in group {group!r}, which trained_groups={list(groups)} leaves out: "
                    f"add {group!r} to trained_groups or leave the tensor out"
                )
            if name in spooled:
                raise ExportError(f"trained tensor {name} is given twice: pass each tensor once")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ExportError(f"trained {name} is {type(value).__name__}, not a floating-point torch.Tensor")
            shape = tuple(value.shape)
            source = source_tensors.get(name)
            if source is not None and shape != source.shape:
                raise ExportError(
                    f"trained {name} has shape {list(shape)} but the source's is {list(source.shape)}: "
                    "pass the tensors trained for this checkpoint"
                )
            if source is None and shapes_of_new.setdefault(name.rsplit(".indexer.", 1)[1], shape) != shape:
                raise ExportError(
                    f"trained {name} has shape {list(shape)}, unlike the same tensor of the other F layers: "
                    "every F layer's indexer must have the same shapes"
                )
            dtype = source.dtype if source is not None else default_dtype
            if dtype not in FLOAT_DTYPES:
                raise ExportError(
                    f"the source stores {name} as {dtype}; trained values can only be cast to "
                    f"{', '.join(FLOAT_DTYPES)}: export from the BF16/FP32 checkpoint"
                )
            if not bool(torch.isfinite(value).all()):
                raise ExportError(f"trained {name} has non-finite values: export an earlier, finite checkpoint")
            stored = value.detach().to(device="cpu", dtype=torch_dtype(dtype)).contiguous()
            data = stored.reshape(-1).view(torch.uint8).numpy()
            start = out.tell()
            out.write(memoryview(data))
            spooled[name] = _Spooled(TensorInfo(spool, dtype, shape, start, data.nbytes), group)
    if "indexers" in groups:
        expected = [indexer_tensor_name(layer, part) for layer in pattern.full_layers for part in INDEXER_PARTS]
        missing = [name for name in expected if name not in spooled]
        if missing:
            raise ExportError(
                f"trained tensor {missing[0]} is missing ({len(missing)} missing in all): pass all "
                f"{len(INDEXER_PARTS)} indexer tensors of every F layer of pattern {pattern}"
            )
    return spooled


def _plan_shards(
    source: _Source, pattern: IndexCachePattern, keep_shared: bool, spooled: Mapping[str, _Spooled]
) -> dict[str, dict[str, TensorInfo]]:
    """Shard file -> the tensors it will hold, in the source's order; a shard whose plan equals its source is linked."""
    plans: dict[str, dict[str, TensorInfo]] = {}
    for shard_name, header in source.shards.items():
        plan: dict[str, TensorInfo] = {}
        for name, info in header.tensors.items():
            layer = indexer_layer(name, pattern.num_layers)
            if name in spooled:
                plan[name] = spooled[name].info
            elif layer is None or pattern.is_full(layer) or keep_shared:
                plan[name] = info
            # else: an S layer's indexer in a family that builds none there; it is left out
        plans[shard_name] = plan
    placed = {name for plan in plans.values() for name in plan}
    for name, value in spooled.items():
        if name not in placed:  # an F layer the source has no indexer for: put it beside that layer's weights
            prefix = name.split(".self_attn.indexer.")[0] + "."
            shard_name = next(
                (s for s, header in source.shards.items() if any(n.startswith(prefix) for n in header.tensors)),
                next(reversed(source.shards)),
            )
            plans[shard_name][name] = value.info
    return plans


def _write_shards(
    staging: Path, source: _Source, plans: Mapping[str, Mapping[str, TensorInfo]], spooled: Mapping[str, _Spooled]
) -> dict[str, dict[str, Any]]:
    """Write (or hard-link) every shard and the index; return each tensor's checksum entry, by name."""
    digests: dict[str, str] = {}
    for shard_name, plan in plans.items():
        header = source.shards[shard_name]
        if plan == header.tensors:
            _link_or_copy(header.path, staging / shard_name)
            digests.update({name: tensor_sha256(info) for name, info in plan.items()})
        else:
            digests.update(write_safetensors(staging / shard_name, plan, header.metadata))
    if source.index_metadata is not None:
        metadata = dict(source.index_metadata)
        metadata["total_size"] = sum(tensor.nbytes for plan in plans.values() for tensor in plan.values())
        weight_map = {name: shard_name for shard_name, plan in plans.items() for name in plan}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        _write_text(staging / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    entries = {
        name: {
            "shard": shard_name,
            "dtype": info.dtype,
            "shape": list(info.shape),
            "sha256": digests[name],
            "trained": spooled[name].group if name in spooled else None,
        }
        for shard_name, plan in plans.items()
        for name, info in plan.items()
    }
    return dict(sorted(entries.items()))


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
