"""Check an IndexCache serving export against the contract of docs/DESIGN.md section 3.

This module owns the contract (indexer tensor names, the config edit, which families keep S-layer indexers, the
checksum record); `indexcache.export` produces it and runs `validate_export` on the temporary directory before
renaming it into place. It needs no torch, so `python -m indexcache.validate_export DIR` runs anywhere the files are;
with torch and transformers at hand it also checks that the export holds every tensor the model built from its
config.json loads (`indexcache.source_check`), which no record or source can vouch for.

Integrity needs no source: the export records the sha256, dtype, shape and shard of every tensor it writes or
copies (CHECKSUM_FILE, itself hashed in indexcache.json), so a flipped byte or a tensor dropped from both its
shard and the index is caught from the export alone. With the source at hand, every tensor the run did not train
must also equal the source's bytes; tensors the run trained are checked against the record, never the source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexcache.contract import (
    CHECKSUM_FILE,
    INDEXER_PARTS,
    KEEPS_SHARED_INDEXERS,
    PATTERN_KEYS,
    RECORD_FILE,
    SINGLE_FILE,
    TRAINED_GROUPS,
)
from indexcache.pattern import IndexCachePattern
from indexcache.safetensors_io import (
    INDEX_FILE,
    SafetensorsFormatError,
    ShardHeader,
    TensorInfo,
    read_header,
    tensor_sha256,
)

try:  # the model's own needs are read with torch and transformers; without them only the files are checked
    from indexcache.source_check import expected_tensors
except ImportError:
    expected_tensors = None

# The contract's names live in `indexcache.contract` (torch-free; the model and the export read them too).
# transformers builds deepseek_v32's indexer on every layer, so its S layers keep theirs (unused at serving time);
# glm_moe_dsa builds none on S layers, and the dense-to-DSA conversions follow glm_moe_dsa. "trained_groups" of
# indexcache.json names what a run trained: the F layers' indexers, and the base (every other tensor the model holds;
# the MTP layer and buffers such as the router's correction bias are not trained).

_INDEXER_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.indexer\.(.+)")
_MAX_LISTED_PROBLEMS = 20


class ExportValidationError(ValueError):
    """An export that breaks the contract; the message lists every problem found."""


def indexer_tensor_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.self_attn.indexer.{part}"


def indexer_layer(name: str, num_layers: int) -> int | None:
    """The DSA layer whose indexer `name` belongs to, or None (not an indexer, or the MTP layer's)."""
    match = _INDEXER_NAME.fullmatch(name)
    if match is None or int(match.group(1)) >= num_layers:
        return None  # model.layers.{num_layers}.* is the MTP layer: outside the pattern, copied unchanged
    return int(match.group(1))


def serving_config(source_config: dict[str, Any], pattern: IndexCachePattern) -> dict[str, Any]:
    """The source's config.json with the pattern keys set; every other key unchanged."""
    config = dict(source_config)
    config["indexer_types"] = pattern.to_indexer_types()
    config["index_topk_pattern"] = pattern.value
    config["use_index_cache"] = True
    uniform = pattern.uniform_params()
    if uniform is None:
        # A stale freq/offset would make engines that read only those keys pick other layers than the pattern.
        config.pop("index_topk_freq", None)
        config.pop("index_skip_topk_offset", None)
    else:
        config["index_topk_freq"], config["index_skip_topk_offset"] = uniform
    return config


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportValidationError(f"cannot read {path}: {err}") from err


def read_shards(directory: Path, problems: list[str]) -> dict[str, ShardHeader]:
    """Shard file name -> header of a checkpoint folder; layout problems (index vs shards) go to `problems`."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            problems.append(f"{INDEX_FILE} has no weight_map object")
            return {}
    elif (directory / SINGLE_FILE).is_file():
        index, weight_map = None, None
    else:
        problems.append(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        return {}

    shard_names = list(dict.fromkeys(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    shards: dict[str, ShardHeader] = {}
    stored_in: dict[str, str] = {}
    for shard_name in shard_names:
        if not (directory / shard_name).is_file():
            problems.append(f"{INDEX_FILE} names shard {shard_name}, which does not exist")
            continue
        try:
            shards[shard_name] = read_header(directory / shard_name)
        except SafetensorsFormatError as err:
            problems.append(str(err))
            continue
        for name in shards[shard_name].tensors:
            if name in stored_in:
                problems.append(f"{name} is stored in both {stored_in[name]} and {shard_name}")
            elif weight_map is not None and weight_map.get(name) != shard_name:
                problems.append(f"{shard_name} holds {name}, which {INDEX_FILE} maps to {weight_map.get(name)}")
            stored_in.setdefault(name, shard_name)

    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if shard_name in shards and name not in shards[shard_name].tensors:
                problems.append(f"{INDEX_FILE} maps {name} to {shard_name}, which does not contain it")
        total = sum(info.nbytes for header in shards.values() for info in header.tensors.values())
        metadata = index.get("metadata")
        declared = metadata.get("total_size") if isinstance(metadata, dict) else None
        if declared != total:
            problems.append(f"{INDEX_FILE} metadata.total_size is {declared}, the shards hold {total} bytes")
    for stray in sorted({p.name for p in directory.glob("*.safetensors")} - set(shard_names)):
        problems.append(f"{stray} is not part of the checkpoint ({INDEX_FILE} does not name it): remove it")
    return shards


def all_tensors(shards: dict[str, ShardHeader]) -> dict[str, TensorInfo]:
    return {name: info for header in shards.values() for name, info in header.tensors.items()}


@dataclass(frozen=True)
class ValidationReport:
    """What a successful validation covered."""

    export_dir: Path
    source_dir: Path | None  # None: integrity checked against the recorded checksums only
    num_tensors: int
    trained: dict[str, int]  # trained group -> tensors the record marks as trained by it


def validate_export(export_dir: Path, source_dir: Path | None = None) -> ValidationReport:
    """Raise ExportValidationError listing every way `export_dir` breaks the export contract.

    Without `source_dir` the export is checked on its own: config keys vs pattern, indexer tensors per layer, index
    and shard consistency, and every tensor against the checksums recorded at export time (none missing, none
    extra, same dtype, shape, shard and sha256). With it, also config and tensors against the source: same dtypes
    and shapes, and every tensor the record does not mark as trained byte-identical to the source's.
    `recorded_source(export_dir)` gives the source the export was made from.
    """
    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        raise ExportValidationError(f"invalid IndexCache export {export_dir}: no config.json")
    config = read_json(export_dir / "config.json")
    if not isinstance(config, dict):
        raise ExportValidationError(f"invalid IndexCache export {export_dir}: config.json is not a JSON object")
    problems: list[str] = []
    pattern = _check_config(config, problems)
    tensors = all_tensors(read_shards(export_dir, problems))
    keep_shared = KEEPS_SHARED_INDEXERS.get(config.get("model_type"))
    if pattern is not None and keep_shared is not None:
        _check_indexer_presence(tensors, pattern, keep_shared, problems)
    record = _check_record(export_dir, pattern, problems)
    # Every stored byte is read once here; the record and the source are compared with these hashes.
    digests = {name: tensor_sha256(info) for name, info in tensors.items()}
    checksums = _check_checksums(export_dir, record, tensors, digests, pattern, problems)
    if source_dir is not None and pattern is not None:
        _compare_with_source(
            Path(source_dir), config, tensors, digests, checksums, pattern, bool(keep_shared), problems
        )
    if pattern is not None and keep_shared is not None and expected_tensors is not None:
        _check_model_needs(export_dir, config, tensors, pattern, keep_shared, problems)
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        lines = [f"invalid IndexCache export {export_dir} ({len(problems)} problem(s)):"]
        lines += [f"  - {problem}" for problem in listed]
        lines += [f"  ... and {more} more"] if more else []
        raise ExportValidationError("\n".join(lines))
    trained: dict[str, int] = {}
    for entry in checksums.values():
        if entry.trained is not None:
            trained[entry.trained] = trained.get(entry.trained, 0) + 1
    return ValidationReport(export_dir, None if source_dir is None else Path(source_dir), len(tensors), trained)


def recorded_source(export_dir: Path) -> Path | None:
    """The source checkpoint indexcache.json names, if it is still there and readable (else None)."""
    try:
        record = json.loads((Path(export_dir) / RECORD_FILE).read_text())
        path = Path(record["source"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    config = path / "config.json"
    return path if config.is_file() and os.access(config, os.R_OK) else None


def _check_config(config: dict[str, Any], problems: list[str]) -> IndexCachePattern | None:
    """Check the pattern keys of config.json for consistency; return the pattern when it is usable."""
    if config.get("model_type") not in KEEPS_SHARED_INDEXERS:
        problems.append(
            f"config.json model_type {config.get('model_type')!r} is not one IndexCache exports "
            f"({', '.join(KEEPS_SHARED_INDEXERS)})"
        )
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int):
        problems.append(f"config.json num_hidden_layers is {num_layers!r}, not an integer")
        return None
    if config.get("use_index_cache") is not True:
        problems.append(f"config.json use_index_cache is {config.get('use_index_cache')!r}, must be true")
    text = config.get("index_topk_pattern")
    if not isinstance(text, str):
        problems.append(f"config.json index_topk_pattern is {text!r}, not an F/S string")
        return None
    try:
        pattern = IndexCachePattern(text)  # not `parse`: engines read the string verbatim, so no normalising here
    except ValueError as err:
        problems.append(f"config.json index_topk_pattern: {err}")
        return None
    if pattern.num_layers != num_layers:
        problems.append(
            f"config.json index_topk_pattern has {pattern.num_layers} layers, num_hidden_layers is {num_layers}"
        )
        return None

    indexer_types = config.get("indexer_types")
    expected_types = pattern.to_indexer_types()
    if not isinstance(indexer_types, list) or len(indexer_types) != num_layers:
        problems.append(
            f"config.json indexer_types must list {num_layers} 'full'/'shared' entries, got {indexer_types!r}"
        )
    elif indexer_types != expected_types:
        layer = next(i for i, (a, b) in enumerate(zip(indexer_types, expected_types, strict=True)) if a != b)
        problems.append(
            f"config.json indexer_types[{layer}] is {indexer_types[layer]!r} but index_topk_pattern has "
            f"{pattern.value[layer]!r} at layer {layer}"
        )

    freq, offset = config.get("index_topk_freq"), config.get("index_skip_topk_offset")
    uniform = pattern.uniform_params()
    if freq is None and offset is None:
        if uniform is not None:
            problems.append(
                f"config.json lacks index_topk_freq/index_skip_topk_offset although the pattern is uniform "
                f"(freq={uniform[0]}, offset={uniform[1]}): engines reading only those keys would keep every indexer"
            )
    elif not (isinstance(freq, int) and isinstance(offset, int) and freq >= 1 and offset >= 1):
        problems.append(
            f"config.json index_topk_freq={freq!r}, index_skip_topk_offset={offset!r}: both must be integers >= 1 "
            "(or both absent when the pattern is not uniform)"
        )
    elif IndexCachePattern.uniform(num_layers, freq, offset) != pattern:
        problems.append(
            f"config.json index_topk_freq={freq}, index_skip_topk_offset={offset} give "
            f"{IndexCachePattern.uniform(num_layers, freq, offset).value!r}, not index_topk_pattern {pattern.value!r}"
        )
    return pattern


def _check_indexer_presence(
    tensors: dict[str, TensorInfo], pattern: IndexCachePattern, keep_shared: bool, problems: list[str]
) -> None:
    for layer in range(pattern.num_layers):
        full = pattern.is_full(layer)
        for part in INDEXER_PARTS:
            name = indexer_tensor_name(layer, part)
            if full and name not in tensors:
                problems.append(f"F layer {layer} lacks {name}")
            elif not full and keep_shared and name not in tensors:
                problems.append(f"S layer {layer} lacks {name} (this family keeps every layer's indexer)")
    if not keep_shared:
        for name in tensors:
            layer = indexer_layer(name, pattern.num_layers)
            if layer is not None and not pattern.is_full(layer):
                problems.append(f"S layer {layer} still has {name}: S layers must carry no indexer tensors")


def _check_model_needs(
    export_dir: Path,
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    pattern: IndexCachePattern,
    keep_shared: bool,
    problems: list[str],
) -> None:
    """Every tensor the model built from config.json loads must be in the export, in its shape.

    The checksums and the source only say that nothing changed since export: an export of a source that already
    lacked a tensor (in its shard and its index alike) matches both, and transformers would load it with that
    tensor at its random init. S layers carry no indexer by the contract, whatever the model builds there.
    """
    try:
        expected = expected_tensors(export_dir)
    except (ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        problems.append(f"config.json does not build a {config.get('model_type')} model ({first})")
        return
    misshapen = []
    for name, shape in expected.items():
        layer = indexer_layer(name, pattern.num_layers)
        if layer is not None and not pattern.is_full(layer) and not keep_shared:
            continue
        info = tensors.get(name)
        if info is None:
            problems.append(
                f"{name} is missing: the {config.get('model_type')} model built from config.json needs it "
                "(transformers would give it its random init)"
            )
        elif info.shape != shape:
            misshapen.append(f"{name} is {list(info.shape)}, the model needs {list(shape)}")
    if misshapen:  # one line: a changed config.json key misshapes most tensors at once
        problems.append(
            f"{len(misshapen)} tensor(s) do not have the shape the model built from config.json needs ({misshapen[0]})"
        )


def _check_record(export_dir: Path, pattern: IndexCachePattern | None, problems: list[str]) -> dict[str, Any] | None:
    record_path = export_dir / RECORD_FILE
    if not record_path.is_file():
        problems.append(f"no {RECORD_FILE}")
        return None
    record = read_json(record_path)
    if not isinstance(record, dict):
        problems.append(f"{RECORD_FILE} is not a JSON object")
        return None
    recorded = record.get("pattern")
    if pattern is not None and recorded != pattern.value:
        problems.append(f"{RECORD_FILE} pattern {recorded!r} differs from config.json's {pattern.value!r}")
    groups = record.get("trained_groups")
    if not isinstance(groups, list) or not set(groups) <= set(TRAINED_GROUPS):
        problems.append(f"{RECORD_FILE} trained_groups is {groups!r}, not a list drawn from {list(TRAINED_GROUPS)}")
        record = {**record, "trained_groups": []}
    return record


@dataclass(frozen=True)
class _Recorded:
    """One tensor as the export recorded it."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    trained: str | None  # the group that trained it, or None (copied from the source)


def _check_checksums(
    export_dir: Path,
    record: dict[str, Any] | None,
    tensors: dict[str, TensorInfo],
    digests: dict[str, str],
    pattern: IndexCachePattern | None,
    problems: list[str],
) -> dict[str, _Recorded]:
    """Check every stored tensor against the checksums recorded at export time; return the record by name."""
    if record is None:
        return {}
    path = export_dir / CHECKSUM_FILE
    if not path.is_file():
        problems.append(f"no {CHECKSUM_FILE} (the per-tensor checksums): re-export with this version")
        return {}
    raw = path.read_bytes()
    expected = (record.get("tensors") or {}).get("sha256") if isinstance(record.get("tensors"), dict) else None
    if hashlib.sha256(raw).hexdigest() != expected:
        problems.append(f"{CHECKSUM_FILE} does not match the sha256 {RECORD_FILE} records for it: it was altered")
        return {}
    try:
        entries = {
            name: _Recorded(e["shard"], e["dtype"], tuple(e["shape"]), e["sha256"], e["trained"])
            for name, e in json.loads(raw)["tensors"].items()
        }
    except (ValueError, KeyError, TypeError) as err:
        problems.append(f"{CHECKSUM_FILE} is malformed ({err!r}): re-export")
        return {}

    groups = set(record.get("trained_groups") or [])
    for name in sorted(set(entries) - set(tensors)):
        problems.append(f"{name} is recorded in {CHECKSUM_FILE} but missing from the export")
    for name in sorted(set(tensors) - set(entries)):
        problems.append(f"{name} is in the export but not recorded in {CHECKSUM_FILE}")
    for name, entry in entries.items():
        info = tensors.get(name)
        if info is None:
            continue
        stored = (info.path.name, info.dtype, info.shape)
        if stored != (entry.shard, entry.dtype, entry.shape):
            problems.append(
                f"{name} is {info.dtype}{list(info.shape)} in {info.path.name}, recorded as "
                f"{entry.dtype}{list(entry.shape)} in {entry.shard}"
            )
        elif digests[name] != entry.sha256:
            problems.append(f"{name} has changed since export: its sha256 differs from {CHECKSUM_FILE}")
        if entry.trained is not None and entry.trained not in groups:
            problems.append(f"{name} is marked trained by {entry.trained!r}, not in trained_groups {sorted(groups)}")
        if pattern is not None:
            layer = indexer_layer(name, pattern.num_layers)
            is_f_indexer = layer is not None and pattern.is_full(layer)
            if entry.trained == "indexers" and not is_f_indexer:
                problems.append(f"{name} is marked as a trained indexer but is not an F layer's indexer")
            if entry.trained == "base" and layer is not None:
                problems.append(f"{name} is a pattern layer's indexer but is marked as trained base")
            if is_f_indexer and "indexers" in groups and entry.trained != "indexers":
                problems.append(f"{name} is an F layer's indexer but is not marked as trained")
    return entries


def _compare_with_source(
    source_dir: Path,
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    digests: dict[str, str],
    checksums: dict[str, _Recorded],
    pattern: IndexCachePattern,
    keep_shared: bool,
    problems: list[str],
) -> None:
    source_config = read_json(source_dir / "config.json")
    for key in sorted((set(source_config) | set(config)) - set(PATTERN_KEYS)):
        if source_config.get(key) != config.get(key):
            problems.append(f"config.json {key} is {config.get(key)!r}, the source has {source_config.get(key)!r}")

    source_problems: list[str] = []
    source_tensors = all_tensors(read_shards(source_dir, source_problems))
    problems.extend(f"source {source_dir}: {problem}" for problem in source_problems)
    for name, source in source_tensors.items():
        layer = indexer_layer(name, pattern.num_layers)
        exported = tensors.get(name)
        if exported is None:
            if layer is None or pattern.is_full(layer) or keep_shared:
                problems.append(f"{name} of the source is missing from the export")
            continue
        recorded = checksums.get(name)
        if (exported.dtype, exported.shape) != (source.dtype, source.shape):
            problems.append(
                f"{name} is {exported.dtype}{list(exported.shape)} in the export, "
                f"{source.dtype}{list(source.shape)} in the source"
            )
        elif recorded is not None and recorded.trained is not None:
            continue  # a trained tensor: checked against the run's record above, never against the source
        elif not _same_bytes(exported, source, digests[name]):
            problems.append(f"{name} differs from the source's bytes (only tensors the run trained may change)")
    for name in sorted(set(tensors) - set(source_tensors)):
        layer = indexer_layer(name, pattern.num_layers)
        if layer is None or not pattern.is_full(layer):
            problems.append(f"{name} is in the export but not in the source")


def _same_bytes(exported: TensorInfo, source: TensorInfo, exported_sha256: str) -> bool:
    if exported.start == source.start and os.path.samefile(exported.path, source.path):
        return True  # a hard-linked shard: the very same bytes, nothing more to read
    return tensor_sha256(source) == exported_sha256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m indexcache.validate_export", description="Check an IndexCache serving export."
    )
    parser.add_argument("export_dir", type=Path, help="the exported checkpoint folder")
    sources = parser.add_mutually_exclusive_group()
    sources.add_argument(
        "--source",
        type=Path,
        default=None,
        help="the source checkpoint for byte-level checks (default: the one indexcache.json records, if readable)",
    )
    sources.add_argument("--no-source", action="store_true", help="check integrity against the recorded checksums only")
    args = parser.parse_args(argv)
    source = None if args.no_source else args.source or recorded_source(args.export_dir)
    try:
        report = validate_export(args.export_dir, source)
    except ExportValidationError as err:
        print(err, file=sys.stderr)
        return 1
    against = f"source {report.source_dir}" if report.source_dir else "the recorded checksums only (no source)"
    trained = ", ".join(f"{count} {group}" for group, count in report.trained.items()) or "none"
    print(
        f"valid IndexCache export: {args.export_dir} ({report.num_tensors} tensors, trained: {trained}; "
        f"checked against {against})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
